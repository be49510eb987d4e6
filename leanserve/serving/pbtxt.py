"""config.pbtxt as a plain dict, rendered and parsed through Triton's own ModelConfig proto.

Repository code builds a config as a dict (STYLE.md item 6); this module is the only place that
turns it into text and back. Going through ``inference.ModelConfig`` (shipped with tritonclient)
means a misspelt field or an unknown enum value is refused here, with the field named, instead of
by a tritonserver that dies at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2

from leanserve.serving.errors import ConfigError, RepositoryError

CONFIG_FILE = "config.pbtxt"

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
}


def to_message(config: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """The dict as a ModelConfig; ConfigError names the first field Triton would refuse."""
    try:
        return json_format.ParseDict(config, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt: {exc} (see Triton's model_config.proto for the "
                          "allowed fields)") from None


def render(config: dict[str, Any]) -> str:
    """config.pbtxt text for a config dict (snake_case proto field names, enums as strings)."""
    validate(config)
    return text_format.MessageToString(to_message(config))


def write(config: dict[str, Any], model_dir: Path) -> Path:
    """Render ``config`` into ``model_dir/config.pbtxt``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILE
    text = render(config)
    path.unlink(missing_ok=True)  # never write through a hard link into another repository
    path.write_text(text, encoding="utf-8")
    return path


def parse(text: str, source: str = CONFIG_FILE) -> dict[str, Any]:
    """A config.pbtxt's text as a dict (ints stay ints); RepositoryError with file and line."""
    msg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: malformed config.pbtxt: {exc} (fix the file or "
                              "regenerate the repository)") from None
    return message_to_dict(msg)


def read(model_dir: Path) -> dict[str, Any]:
    """Parse ``model_dir/config.pbtxt``; RepositoryError when missing or malformed."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise RepositoryError(f"{path}: missing config.pbtxt (every model directory needs one)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path}: cannot read config.pbtxt ({exc})") from None
    return parse(text, str(path))


def message_to_dict(msg: Message) -> dict[str, Any]:
    """Like json_format.MessageToDict with proto names, but 64-bit ints stay Python ints."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        out[field.name] = _value_to_py(field, value)
    return out


def _value_to_py(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            return {k: _scalar(value_field, v) for k, v in value.items()}
        if field.label == FieldDescriptor.LABEL_REPEATED:
            return [message_to_dict(v) for v in value]
        return message_to_dict(value)
    if field.label == FieldDescriptor.LABEL_REPEATED:
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type in _INT64_TYPES:
        return int(value)
    return value


def validate(config: dict[str, Any]) -> None:
    """Checks the proto cannot express; each ConfigError names the field and allowed range."""
    name = config.get("name", "")
    if not name:
        raise ConfigError("config.pbtxt: name is empty (allowed: a model directory name)")
    mbs = int(config.get("max_batch_size", 0))
    if not 0 <= mbs <= 1_000_000:
        raise ConfigError(f"{name}: max_batch_size {mbs} out of range (allowed: 0 to 1000000)")
    dyn = config.get("dynamic_batching")
    if dyn is not None:
        if mbs < 1:
            raise ConfigError(f"{name}: dynamic_batching needs max_batch_size >= 1 "
                              f"(got {mbs})")
        for size in dyn.get("preferred_batch_size", []):
            if not 1 <= int(size) <= mbs:
                raise ConfigError(f"{name}: dynamic_batching.preferred_batch_size {size} "
                                  f"out of range (allowed: 1 to max_batch_size {mbs})")
        delay = int(dyn.get("max_queue_delay_microseconds", 0))
        if delay < 0:
            raise ConfigError(f"{name}: dynamic_batching.max_queue_delay_microseconds {delay} "
                              "out of range (allowed: >= 0)")
    for group in config.get("instance_group", []):
        count = int(group.get("count", 1))
        if count < 1:
            raise ConfigError(f"{name}: instance_group.count {count} out of range "
                              "(allowed: >= 1)")
