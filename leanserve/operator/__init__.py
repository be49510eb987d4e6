"""The Kubernetes operator: reconcile CompressedModel resources into Jobs, Deployments and status.

Layout (thin handlers over pure planning, STYLE.md 1):
- ``constants``: names, labels, reasons — each defined once;
- ``settings``: the operator's settings (nested dataclasses, loaded from the environment);
- ``builders``: pure functions spec -> Kubernetes object dicts;
- ``planner``: pure ``plan(resource, observed, now) -> Desired``;
- ``handback``: the report summary the compression Job writes to its termination message;
- ``kube``: a small async API client (create/apply/patch/delete/discovery);
- ``handlers``: the kopf handlers that observe, plan and apply;
- ``platform``: the Kubernetes adapter of the autoscaler's Platform port;
- ``jobrunner``: the entry point the compression Job runs.
"""
