"""Running the pipeline on Kubernetes: manifests as pure functions of the configuration, and
the commands that talk to a cluster.

* ``manifests``: the checks a cluster run needs, names, labels, the ConfigMap, service
  accounts and the driver's Role, the headless Service of the training pods.
* ``jobs``: the stage Jobs (preprocess, the Indexed training Job, evaluate + push), the
  driver Job and the schedule's CronJob.
* ``predict_jobs``: batch prediction (``finetune predict``) as a Job or a CronJob, with its
  own checks: on demand under a new name each time, or on schedule.
* ``cron``: cron schedules checked as Kubernetes parses them.
* ``render``: ``finetune render`` (``--predict``: a predict Job's): YAML to stdout, to a
  folder, or as the kustomize tree of ``k8s/``.
* ``views``: Jobs and pods as the API returns them, read into states and printed lines
  (``finetune status``, ``finetune logs``, the driver's progress); pure.
* ``driver``: ``finetune drive``, the run's stages as Jobs, in the driver pod; its
  decisions are pure functions, its loop polls the cluster.
* ``client``: the only module that talks to an API server (the official ``kubernetes``
  client); ``pipeline.cluster_cli`` wires it to ``submit``, ``status``, ``logs``,
  ``schedule`` and ``unschedule`` (``pipeline.cluster_predict`` and ``pipeline.cluster_logs``
  for predict Jobs and logs).

Nothing here imports TensorFlow.
"""
