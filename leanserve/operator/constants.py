"""Every name the operator writes into the cluster, defined once (DESIGN.md section 3).

Users, dashboards and GitOps tools select on these labels and read these reasons: a typo here
would be a silent contract break, so nothing else in the operator spells them out.
"""

from __future__ import annotations

import enum

from leanserve.api.spec import GROUP

MANAGER = "leanserve"
# One field manager for every write the operator and its autoscaler make (server-side apply of
# the children, the scale subresource): nothing it set is ever owned by a second manager.
FIELD_MANAGER = MANAGER
# The component named in the Events the operator posts.
EVENT_COMPONENT = "leanserve-operator"


class Label(str, enum.Enum):
    MANAGED_BY = "app.kubernetes.io/managed-by"
    NAME = "app.kubernetes.io/name"
    COMPONENT = "app.kubernetes.io/component"
    MODEL = f"{GROUP}/model"
    POOL = f"{GROUP}/pool"
    RECIPE = f"{GROUP}/recipe-hash"
    JOB_NAME = "job-name"
    JOB_NAME_NEW = "batch.kubernetes.io/job-name"
    # Set to "true" on a Secret by its owner to let CompressedModels of its namespace name it.
    ALLOW_REFERENCE = f"{GROUP}/allow-reference"


class Annotation(str, enum.Enum):
    ARTIFACT_SHA = f"{GROUP}/artifact-sha256"
    PROM_SCRAPE = "prometheus.io/scrape"
    PROM_PORT = "prometheus.io/port"
    PROM_PATH = "prometheus.io/path"
    COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
    # Set (to any new value) by a user to run the current recipe's compression Job again.
    RETRY = f"{GROUP}/retry"


class Component(str, enum.Enum):
    COMPRESSION = "compression"
    SERVING = "serving"


class Reason(str, enum.Enum):
    """Condition and Event reasons (kstatus: CamelCase, stable)."""

    INVALID_SPEC = "InvalidSpec"
    COMPRESSING = "Compressing"
    JOB_FAILED = "JobFailed"
    REPORT_MISSING = "ReportMissing"
    NO_CANDIDATE_PASSED = "NoCandidatePassed"
    COMPRESSED = "Compressed"
    AWAITING_COMPRESSION = "AwaitingCompression"
    ROLLING_OUT = "RollingOut"
    REPLICAS_UNAVAILABLE = "ReplicasUnavailable"
    DEPLOYED = "Deployed"
    SERVING = "Serving"
    PROFILE_MEETS_SLO = "ProfileMeetsSLO"
    NO_POOL_MEETS_SLO = "NoPoolMeetsSLO"
    NO_PROFILE = "NoProfile"
    WITHIN_BUDGET = "WithinBudget"
    OVER_BUDGET = "OverBudget"
    NO_BUDGET = "NoBudget"
    API_REFUSED = "APIRefused"
    CLAIM_NOT_SHARED = "ClaimNotShared"
    CLAIM_MISSING = "ClaimMissing"
    JOB_NOT_STARTING = "JobNotStarting"
    # The spec asks for something the operator's settings do not allow (an image, a
    # toleration, a Secret without the opt-in label, a Prometheus URL): nothing is made.
    FORBIDDEN = "Forbidden"
    # The Autoscaling condition: the autoscaler acts, has not stepped yet, or cannot act (no
    # profile, no metrics, a profile without a pool, the limits bind; Forbidden, APIRefused).
    AUTOSCALING_ACTIVE = "Active"
    AUTOSCALING_PENDING = "Pending"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    PROFILE_INVALID = "ProfileInvalid"
    LIMITED = "LimitedByMaxReplicasOrBudget"


# Condition reasons that mean something is wrong: their Events are type Warning.
PROBLEM_REASONS = frozenset(r.value for r in (
    Reason.INVALID_SPEC, Reason.JOB_FAILED, Reason.REPORT_MISSING, Reason.NO_CANDIDATE_PASSED,
    Reason.REPLICAS_UNAVAILABLE, Reason.NO_POOL_MEETS_SLO, Reason.OVER_BUDGET,
    Reason.API_REFUSED, Reason.JOB_NOT_STARTING, Reason.CLAIM_NOT_SHARED, Reason.CLAIM_MISSING,
    Reason.FORBIDDEN, Reason.NO_PROFILE, Reason.METRICS_UNAVAILABLE, Reason.PROFILE_INVALID,
    Reason.LIMITED))

# Access modes a claim shared by the Job and every serving replica (on any node) may have.
SHARED_ACCESS_MODES = ("ReadWriteMany", "ReadOnlyMany")

# A recipe's outcome, remembered in status.recipe.outcome: the Compressed condition's reason.
TERMINAL_OUTCOMES = frozenset(r.value for r in (
    Reason.COMPRESSED, Reason.JOB_FAILED, Reason.NO_CANDIDATE_PASSED, Reason.REPORT_MISSING))


class Port(int, enum.Enum):
    HTTP = 8000
    GRPC = 8001
    METRICS = 8002


class JobState(str, enum.Enum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class MonitorKind(str, enum.Enum):
    """Which Prometheus Operator CRD exists in the cluster (discovered, never assumed)."""

    NONE = "none"
    SERVICE_MONITOR = "ServiceMonitor"
    POD_MONITOR = "PodMonitor"


TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096
SPEC_MOUNT = "/spec"
SPEC_FILE = "spec.yaml"
STORE_ROOT = "/stores"
WORK_DIR = "/work"
MODEL_MOUNT = "/models"
RENDEZVOUS_PORT = 29500
