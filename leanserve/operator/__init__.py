"""The Kubernetes operator: reconcile CompressedModel resources into Jobs, Deployments and status.

Layout (thin handlers over pure planning, STYLE.md 1):
- ``constants``: names, labels, reasons — each defined once;
- ``settings``: the operator's settings (nested dataclasses, loaded from the environment);
- ``builders``: pure functions spec -> Kubernetes object dicts;
- ``planner``: pure ``plan(resource, observed, now) -> Desired``;
- ``privilege``: what a spec may make the operator do (images, tolerations, Secrets, URLs);
- ``handback``: the report summary the compression Job writes to its termination message;
- ``kube``: a small async API client (server-side apply, status merge patch, discovery);
- ``handlers``: the kopf watch-event handlers and the resync loop that observe, plan and apply;
- ``lease``: leader election on a coordination.k8s.io Lease;
- ``access``: every API access the operator makes, as RBAC rules (deploy/operator's source);
- ``platform``: the Kubernetes adapter of the autoscaler's Platform port;
- ``jobrunner``: the entry point the compression Job runs.
"""
