"""The CompressedModel resource as pydantic models.

These models are the single source of truth for the public contract of DESIGN.md section 2:
the CLI validates with them, the operator parses with them, and the CRD's openAPIV3Schema is
generated from them (``leanserve.api.crd``). Field names are the camelCase names users write;
Python code reads the snake_case attributes.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from leanserve.api import validators as v

GROUP = "leanserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CompressedModel"
PLURAL = "compressedmodels"
SINGULAR = "compressedmodel"
SHORT_NAME = "cmod"

# A DNS-1035 label: candidate and pool names end up in object names (X-<pool>) and paths.
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"

MAX_CANDIDATES = 32
MAX_STEPS = 8
MAX_POOLS = 16


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """x-kubernetes-validations for a model's schema: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class Model(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
        allow_inf_nan=False,
        # types as the API server checks them: no true for a number, no "5" for an integer, no
        # 1.5 for an integer (enum fields, which take their strings, say strict=False)
        strict=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as a user would write it (camelCase, enums as strings)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ModelFormat(str, enum.Enum):
    HUGGINGFACE = "huggingface"
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


class Task(str, enum.Enum):
    FEATURE_EXTRACTION = "feature-extraction"
    TEXT_CLASSIFICATION = "text-classification"
    IMAGE_CLASSIFICATION = "image-classification"

    @property
    def is_text(self) -> bool:
        return self is not Task.IMAGE_CLASSIFICATION


class QuantizeMethod(str, enum.Enum):
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8_WEIGHT_ONLY = "int8-weight-only"
    INT4_WEIGHT_ONLY = "int4-weight-only"
    POWER_OF_TWO = "power-of-two"
    BINARY = "binary"
    QAT = "qat"


class ActivationQuant(str, enum.Enum):
    DYNAMIC = "dynamic"
    STATIC = "static"


class Precision(str, enum.Enum):
    """Arithmetic of a training step (leanserve.compression.precision)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


PRECISION_DESCRIPTION = ("Training arithmetic: fp32, bf16 (autocast, CPU or GPU) or fp16 "
                         "(autocast with a gradient scaler, GPU only).")


class PruneMethod(str, enum.Enum):
    MAGNITUDE = "magnitude"
    STRUCTURED = "structured"


class Granularity(str, enum.Enum):
    NEURON = "neuron"
    CHANNEL = "channel"
    HEAD = "head"


class Importance(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"
    TAYLOR = "taylor"
    GRADIENT_NORM = "gradient-norm"
    ACTIVATION = "activation"
    """Transformer units: rms of the unit's activations on training rows x the norm of its
    outgoing weights (Wanda's score, per unit)."""


class QualityMetric(str, enum.Enum):
    COSINE = "cosine"
    ACCURACY = "accuracy"


class Accelerator(str, enum.Enum):
    NONE = "none"
    NVIDIA_GPU = "nvidia-gpu"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    COMPRESSING = "Compressing"
    DEPLOYING = "Deploying"
    SERVING = "Serving"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class ConditionType(str, enum.Enum):
    READY = "Ready"
    COMPRESSED = "Compressed"
    DEPLOYED = "Deployed"
    SLO_MET = "SLOMet"
    BUDGET_MET = "BudgetMet"
    AUTOSCALING = "Autoscaling"
    # kstatus' abnormal-true conditions (Flux, kpt, Config Sync): present and True only while
    # the operator works towards the spec (Reconciling) or has stopped and needs a person
    # (Stalled); absent otherwise.
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class ConditionStatus(str, enum.Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# --------------------------------------------------------------------------------------------
# spec.model, spec.data, spec.artifacts

E = TypeVar("E", bound=enum.Enum)
Lax = Annotated[E, Strict(False)]
"""An enum field: its string value is accepted (the models are strict otherwise)."""

Uri = Annotated[str, AfterValidator(v.check_uri), Field(json_schema_extra={
    "pattern": v.URI_PATTERN, "maxLength": v.MAX_URI, "x-kubernetes-validations": v.URI_CEL})]
OptionalUri = Annotated[str, AfterValidator(v.check_optional_uri), Field(json_schema_extra={
    "pattern": v.OPTIONAL_URI_PATTERN, "maxLength": v.MAX_URI,
    "x-kubernetes-validations": v.URI_CEL})]


class ModelSource(Model):
    """The trained model to compress."""

    uri: Uri = Field(description="file:///PATH, pvc://CLAIM/PATH, package://PACKAGE/PATH or a "
                     "path relative to the spec file (one machine only). s3:// is not "
                     "supported yet.")
    format: Lax[ModelFormat] = Field(ModelFormat.HUGGINGFACE,
                                     description="How the model is stored.")
    task: Lax[Task] = Field(Task.FEATURE_EXTRACTION, description="What the model computes.")
    max_sequence_length: int = Field(128, ge=1, le=8192,
                                     description="Tokens per input for text models.")


class DataSource(Model):
    """Calibration, evaluation and distillation data."""

    uri: Uri = Field(description="jsonl ({\"text\", \"label\"}) or npz (x, y); a URI as "
                     "spec.model.uri, relative paths resolve against the spec file's folder. A "
                     "jsonl row may carry \"split\": \"train\" (only trained and calibrated "
                     "on), \"validation\" (always in the split that gates quality) or "
                     "\"test\" (always in the reported split); a held-out row is never "
                     "trained on.")
    eval_fraction: float = Field(0.25, gt=0, lt=1,
                                 description="Share of the rows without a \"split\" held out "
                                 "to evaluate quality (half validation, half test).")


class Artifacts(Model):
    """Where compressed models and reports go."""

    uri: OptionalUri = Field("", description="Default: beside the model, under "
                             "leanserve/<name>/<hash>/.")
    secret_name: str = Field("", max_length=253, pattern=v.SECRET_NAME,
                             description="Secret with AWS_* keys for s3:// stores.")


# --------------------------------------------------------------------------------------------
# spec.compression


class QuantizeStep(Model):
    method: Lax[QuantizeMethod] = Field(description="Quantization scheme.")
    per_channel: bool = Field(False, description="One scale per output channel.")
    calibration_samples: int = Field(256, ge=1, le=100_000,
                                     description="Rows used to calibrate (int8-static).")
    embedding_bits: int = Field(8, ge=4, le=8, multiple_of=4,
                                description="Bits per weight of token-embedding tables "
                                            "(int8-dynamic): 8, or 4 with one scale per "
                                            "block of 64 weights.")
    block_size: int = Field(32, ge=16, le=256,
                            description="int4-weight-only: weights per scale (a power of two; "
                                        "MatMulNBits blocks).")
    activations: Lax[ActivationQuant] = Field(
        ActivationQuant.DYNAMIC,
        description="qat: int8 activations quantized per call (dynamic, MatMulInteger) or with "
                    "ranges calibrated on calibrationSamples rows (static, QDQ).")
    train_steps: int = Field(200, ge=1, le=100_000,
                             description="qat: fine-tuning steps with fake-quantized weights "
                                         "and activations.")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="qat: optimizer learning rate.")
    precision: Lax[Precision] = Field(Precision.FP32,
                                      description="qat: " + PRECISION_DESCRIPTION[0].lower()
                                      + PRECISION_DESCRIPTION[1:])

    @model_validator(mode="after")
    def _precision_trains(self) -> QuantizeStep:
        if self.precision is not Precision.FP32 and self.method is not QuantizeMethod.QAT:
            raise ValueError(f"quantize precision {self.precision.value} applies to training; "
                             f"method {self.method.value} does not train (allowed: fp32, or "
                             "method qat)")
        return self

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"blockSize must be a power of two (16, 32, 64, 128, 256), "
                             f"not {value}")
        return value


class PruneStep(Model):
    method: Lax[PruneMethod] = Field(description="magnitude (unstructured) or structured.")
    granularity: Lax[Granularity] = Field(Granularity.NEURON,
                                     description="What structured pruning removes.")
    importance: Lax[Importance] = Field(Importance.L1, description="How parts are ranked.")
    sparsity: float = Field(ge=0, lt=1, description="Share of weights or structures removed.")
    iterations: int = Field(1, ge=1, le=100, description="Pruning steps to reach the sparsity.")
    fine_tune_epochs: int = Field(0, ge=0, le=100,
                                  description="Epochs of fine-tuning between pruning steps.")
    reconstruct: bool = Field(False, description="Transformers: refit the Linear after the "
                              "removed neurons or heads by least squares on training "
                              "activations, so each layer keeps its output.")
    precision: Lax[Precision] = Field(Precision.FP32, description=PRECISION_DESCRIPTION)


class StudentConfig(Model):
    """An explicit student architecture of a transformer."""

    num_layers: int = Field(ge=1, le=96, description="Transformer layers or conv blocks.")
    hidden_size: int | None = Field(None, ge=8, le=16384, description="Width of the student.")
    intermediate_size: int | None = Field(None, ge=8, le=65536, description="MLP width.")
    num_attention_heads: int | None = Field(None, ge=1, le=256, description="Attention heads.")


class DistillStep(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("[has(self.studentLayers), has(self.student), has(self.studentWidth)]"
         ".exists_one(x, x)",
         "distill takes exactly one of studentLayers, student, studentWidth"),
    ))

    student_layers: int | None = Field(None, ge=1, le=96,
                                       description="Layers kept from the teacher "
                                                   "(transformers).")
    student: StudentConfig | None = Field(None, description="A student config "
                                                            "(transformers).")
    student_width: float | None = Field(None, gt=0, lt=1,
                                        description="CNNs and MLPs: the share of each hidden "
                                                    "Conv2d's channels and hidden Linear's "
                                                    "units the student keeps (the strongest "
                                                    "by L2 norm, weights copied).")
    epochs: int = Field(1, ge=1, le=1000, description="Training epochs.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target loss.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Optimizer learning rate.")
    batch_size: int = Field(32, ge=1, le=4096, description="Rows per step per worker.")
    workers: int = Field(1, ge=1, le=64, description="DDP world size.")
    steps: int | None = Field(None, ge=1, le=10_000_000,
                              description="Optimizer steps in all (overrides epochs; the "
                                          "training rows are cycled).")
    hidden_weight: float = Field(0.0, ge=0, le=100,
                                 description="Weight of the hidden-state loss between each "
                                             "student layer and the teacher layer it was "
                                             "copied from (a CNN or MLP: each hidden "
                                             "layer's output on the channels it kept).")
    relation_weight: float = Field(0.0, ge=0, le=100,
                                   description="Weight of MiniLM v2's attention-relation loss "
                                               "(query/key/value relations of the last "
                                               "layers, KL).")
    relation_heads: int = Field(12, ge=1, le=256,
                                description="Relation heads of the attention-relation loss.")
    precision: Lax[Precision] = Field(Precision.FP32, description=PRECISION_DESCRIPTION)
    freeze_embeddings: bool = Field(False, description="Keep the student's input embeddings "
                                                       "as copied from the teacher; only the "
                                                       "encoder layers train.")
    token_noise: float = Field(0.0, ge=0, lt=1,
                               description="Share of each training row's tokens replaced, "
                                           "anew at every step, by tokens drawn from the "
                                           "training text; the teacher labels the noisy rows.")

    @model_validator(mode="after")
    def _needs_student(self) -> DistillStep:
        given = [name for name, v in (("studentLayers", self.student_layers),
                                      ("student", self.student),
                                      ("studentWidth", self.student_width)) if v is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise ValueError("distill takes exactly one of studentLayers, student, studentWidth "
                             f"({got}; allowed: studentLayers or student for a transformer, "
                             "studentWidth for a CNN or MLP)")
        return self


class LowRankStep(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("has(self.rankRatio) != has(self.energy)",
         "lowRank takes exactly one of rankRatio, energy"),
    ))

    rank_ratio: float | None = Field(None, gt=0, le=1, description="Rank kept, as a share.")
    energy: float | None = Field(None, gt=0, le=1,
                                 description="Share of squared singular values kept.")
    fine_tune_epochs: int = Field(0, ge=0, le=100,
                                  description="Epochs of fine-tuning the factored model "
                                              "towards the original's outputs.")
    precision: Lax[Precision] = Field(Precision.FP32, description=PRECISION_DESCRIPTION)

    @model_validator(mode="after")
    def _exactly_one(self) -> LowRankStep:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ValueError("lowRank takes exactly one of rankRatio, energy "
                             "(allowed: rankRatio in (0, 1] or energy in (0, 1])")
        return self


STEP_KINDS = ("quantize", "prune", "distill", "lowRank")


class Step(Model):
    """One compression step: exactly one of its keys is set."""

    model_config = ConfigDict(json_schema_extra=_cel(
        ("[has(self.quantize), has(self.prune), has(self.distill), has(self.lowRank)]"
         ".exists_one(x, x)",
         "a step has exactly one of quantize, prune, distill, lowRank"),
    ))

    quantize: QuantizeStep | None = None
    prune: PruneStep | None = None
    distill: DistillStep | None = None
    low_rank: LowRankStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        if len(self.kinds()) != 1:
            raise ValueError("a step has exactly one key "
                             "(allowed: quantize, prune, distill, lowRank)")
        return self

    def kinds(self) -> list[str]:
        return [k for k in STEP_KINDS if getattr(self, to_snake(k)) is not None]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    @property
    def config(self) -> QuantizeStep | PruneStep | DistillStep | LowRankStep:
        return getattr(self, to_snake(self.kind))


class Candidate(Model):
    name: str = Field(pattern=DNS_LABEL, max_length=40,
                      description="Candidate name (a DNS label).")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,
                              description="Applied in order.")


class Compression(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("self.candidates.all(c, self.candidates.exists_one(d, d.name == c.name))",
         "candidate names must be unique"),
    ))

    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES,
                                        description="Compression recipes to try.")

    @model_validator(mode="after")
    def _unique(self) -> Compression:
        _require_unique([c.name for c in self.candidates], "candidates", "candidate")
        return self


class Quality(Model):
    metric: Lax[QualityMetric] = Field(QualityMetric.COSINE,
                                  description="cosine (to the uncompressed model) or accuracy.")
    max_drop: float = Field(0.01, ge=0, le=1,
                            description="Absolute drop allowed against the baseline.")


DEFAULT_SERVING_IMAGE = "ghcr.io/leanserve/serving:24.08-py3"
"""The image leanserve ships for serving (deploy/images/serving: NVIDIA Triton 24.08 plus the
packages the python-backend models import). The operator runs its configured serving image
(LEANSERVE_OPERATOR_SERVING_IMAGE, by default this one) for a spec that keeps it."""
LEGACY_SERVING_IMAGES = ("nvcr.io/nvidia/tritonserver:24.08-py3",)
"""Earlier schema defaults, persisted in CompressedModels created before: served like the default
(the stock Triton image lacks `tokenizers`, so a text model would crash-loop on it)."""


class Serving(Model):
    image: Annotated[str, AfterValidator(v.check_image)] = Field(
        DEFAULT_SERVING_IMAGE, min_length=1,
        json_schema_extra={"pattern": v.IMAGE_PATTERN, "maxLength": v.MAX_IMAGE},
        description="Serving image: a Triton build with what leanserve's python-backend models "
                    "import. The default is leanserve's (deploy/images/serving); the operator "
                    "runs its configured serving image for it.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="Triton max_batch_size.")
    max_queue_delay_microseconds: int = Field(1000, ge=0, le=10_000_000,
                                              description="Dynamic batcher queue delay.")
    queue_timeout_microseconds: int = Field(
        0, ge=0, le=60_000_000,
        description="Triton's queue policy: reject (HTTP 503) a request that waited longer than "
                    "this in the queue instead of answering it late; under overload a backlog "
                    "then stops making every later request late. 0 (Triton's default) keeps "
                    "every request queued. The autoscaler counts rejected requests as load. "
                    "The compression Job writes it into the served repository: on a live "
                    "CompressedModel a change takes effect with the next Job (a new value of "
                    "the leanserve.io/retry annotation runs one), as for maxBatchSize.")


# --------------------------------------------------------------------------------------------
# spec.nodePools, spec.slo, spec.autoscaling

Quantity = Annotated[int | str, BeforeValidator(v.check_quantity), Field(json_schema_extra={
    "x-kubernetes-int-or-string": True, "pattern": v.QUANTITY_PATTERN, "maxLength": 64})]
ResourceList = Annotated[dict[str, Quantity], AfterValidator(v.check_resources)]


class Toleration(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
         "self.value == ''", "a toleration with operator Exists takes no value"),
    ))

    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63, pattern=v.LABEL_VALUE_PATTERN)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, le=10**9)

    @field_validator("key")
    @classmethod
    def _key(cls, key: str | None) -> str | None:
        problem = v.label_key_problem(key) if key else None
        if problem:
            raise ValueError(problem)
        return key

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value: a toleration with operator Exists takes no value "
                             "(allowed: leave value out, or use operator Equal)")
        return self


class Resources(Model):
    requests: ResourceList = Field(default_factory=dict)
    limits: ResourceList = Field(default_factory=dict)


class NodePool(Model):
    name: str = Field(pattern=DNS_LABEL, max_length=40, description="Pool name (a DNS label).")
    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=v.LABEL_VALUE_PATTERN)]],
        AfterValidator(v.check_label_keys)] = Field(
            default_factory=dict, max_length=32,
            description="Node labels a replica needs (keys are checked by the operator).")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16)
    resources: Resources = Field(default_factory=Resources)
    hourly_price: float = Field(gt=0, description="USD for one replica for one hour.")
    accelerator: Lax[Accelerator] = Field(Accelerator.NONE, description="none or nvidia-gpu.")


class SLO(Model):
    latency_p95_ms: float = Field(gt=0, le=600_000, description="p95 latency target.")


class Autoscaling(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"),
    ))

    min_replicas: int = Field(1, ge=1, le=1000, description="At least 1: nothing activates a "
                              "replica on the first request, so scale to zero is refused.")
    max_replicas: int = Field(10, ge=1, le=1000)
    max_hourly_cost: float | None = Field(None, gt=0, description="USD per hour, all pools.")
    interval_seconds: int = Field(30, ge=1, le=3600)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=86_400)
    prometheus_url: Annotated[str, AfterValidator(v.check_http_url)] = Field(
        "http://prometheus-operated.monitoring:9090", min_length=1,
        json_schema_extra={"pattern": v.HTTP_URL_PATTERN, "maxLength": v.MAX_URL},
        description="http(s) URL of Prometheus's HTTP API.")

    @field_validator("min_replicas", mode="before")
    @classmethod
    def _no_scale_to_zero(cls, value: Any) -> Any:
        if value == 0 and not isinstance(value, bool):
            raise ValueError("0 (scale to zero) is not supported: nothing activates a replica on "
                             "the first request (allowed: >= 1)")
        return value

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas "
                             f"({self.max_replicas})")
        return self


MAX_REPLICA_MIXES = 2_000_000
"""The autoscaling policy searches every mix of replicas per pool within maxReplicas and the
budget (exhaustively, which is exact and fast for a few pools); a spec whose mixes are more than
this would make each decision take seconds to hours, so it is refused."""


def replica_mixes(spec: CompressedModelSpec) -> int:
    """How many replica mixes the pools allow: the product over pools of (most replicas of the
    pool within maxReplicas and the budget) + 1."""
    a = spec.autoscaling
    total = 1
    for p in spec.node_pools:
        most = a.max_replicas if a.max_hourly_cost is None else \
            min(a.max_replicas, math.floor(a.max_hourly_cost / p.hourly_price + 1e-9))
        total *= most + 1
        if total > MAX_REPLICA_MIXES:
            break
    return total


BUDGET_CEL = (
    "!has(self.autoscaling) || !has(self.autoscaling.maxHourlyCost) || "
    "self.nodePools.exists(p, p.hourlyPrice * double(has(self.autoscaling.minReplicas) ? "
    "self.autoscaling.minReplicas : 1) <= self.autoscaling.maxHourlyCost)")
"""The budget must pay for minReplicas of at least one pool (the same test as the validator)."""


class CompressedModelSpec(Model):
    model_config = ConfigDict(json_schema_extra=_cel(
        ("self.nodePools.all(p, self.nodePools.exists_one(q, q.name == p.name))",
         "node pool names must be unique"),
        ("!has(self.quality) || !has(self.quality.metric) || self.quality.metric != 'accuracy'"
         " || !has(self.model.task) || self.model.task != 'feature-extraction'",
         "quality.metric accuracy needs a classification task"),
        (BUDGET_CEL, "autoscaling.maxHourlyCost is below the cheapest pool's hourlyPrice x "
                     "minReplicas"),
    ))

    model: ModelSource
    data: DataSource
    artifacts: Artifacts = Field(default_factory=Artifacts)
    compression: Compression
    quality: Quality = Field(default_factory=Quality)
    serving: Serving = Field(default_factory=Serving)
    node_pools: list[NodePool] = Field(min_length=1, max_length=MAX_POOLS)
    slo: SLO
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    @model_validator(mode="after")
    def _cross(self) -> CompressedModelSpec:
        _require_unique([p.name for p in self.node_pools], "nodePools", "node pool")
        if self.quality.metric is QualityMetric.ACCURACY and \
                self.model.task is Task.FEATURE_EXTRACTION:
            raise ValueError("quality.metric: accuracy needs a classification task "
                             "(allowed for feature-extraction: cosine)")
        mixes = replica_mixes(self)
        if mixes > MAX_REPLICA_MIXES:
            raise ValueError(f"autoscaling.maxReplicas: {len(self.node_pools)} pools of up to "
                             f"{self.autoscaling.max_replicas} replicas make {mixes:.3g} replica "
                             f"mixes for the policy to search (allowed: at most "
                             f"{MAX_REPLICA_MIXES:g}; lower maxReplicas, set maxHourlyCost or use "
                             "fewer pools)")
        budget, n = self.autoscaling.max_hourly_cost, self.autoscaling.min_replicas
        if budget is not None and not any(p.hourly_price * n <= budget for p in self.node_pools):
            cheapest = min(self.node_pools, key=lambda p: p.hourly_price)
            need = cheapest.hourly_price * n
            raise ValueError(f"autoscaling.maxHourlyCost: {budget:g} USD/h is below the cheapest "
                             f"pool's price x minReplicas ({cheapest.name}: "
                             f"{cheapest.hourly_price:g} x {n} = {need:g} USD/h; allowed: >= "
                             f"{need:g})")
        return self


# --------------------------------------------------------------------------------------------
# status


class Condition(Model):
    model_config = ConfigDict(strict=False)

    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int = 0


class ArtifactStatus(Model):
    model_config = ConfigDict(strict=False)

    uri: str = ""
    sha256: str = ""


class ServingStatus(Model):
    model_config = ConfigDict(strict=False)

    pool: str = ""
    replicas: int = 0
    ready_replicas: int = 0
    endpoint: str = ""


class CostStatus(Model):
    model_config = ConfigDict(strict=False)

    hourly: float = 0.0
    per_million_requests: float = 0.0


class CompressedModelStatus(Model):
    model_config = ConfigDict(extra="allow", strict=False)

    phase: Phase = Phase.PENDING
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    compression: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    artifact: ArtifactStatus = Field(default_factory=ArtifactStatus)
    serving: ServingStatus = Field(default_factory=ServingStatus)
    cost: CostStatus = Field(default_factory=CostStatus)


METADATA_NAME_MAX = 52
"""Child objects are named <name>-<pool>, <name>-compress-<hash>: a name leaves room for them."""


class ObjectMeta(BaseModel):
    """metadata: the name is checked; the other fields of a Kubernetes ObjectMeta are allowed
    (the operator parses objects from the API server) and anything else is refused, as the API
    server's strict field validation does."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    name: str = Field(pattern=v.DNS_1035_LABEL, max_length=METADATA_NAME_MAX)
    namespace: str | None = Field(None, pattern=v.DNS_1123_LABEL_PATTERN, max_length=63)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generate_name: str | None = None
    self_link: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: int | None = None
    owner_references: list[Any] | None = None
    finalizers: list[str] | None = None
    managed_fields: list[Any] | None = None


class CompressedModel(Model):
    api_version: Literal["leanserve.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["CompressedModel"]
    metadata: ObjectMeta
    spec: CompressedModelSpec
    status: CompressedModelStatus | None = None


# --------------------------------------------------------------------------------------------


def to_snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _require_unique(names: list[str], field: str, what: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise ValueError(f"{field}.{i}.name: {what} name {n!r} is used twice "
                             "(allowed: unique names)")
        seen.add(n)
