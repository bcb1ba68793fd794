"""Training: the frozen-feature baseline and the fine-tuned candidate, under tf.distribute."""
