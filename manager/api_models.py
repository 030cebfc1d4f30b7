"""The shapes of the manager's API: request bodies with their real limits, and the
error answers, as the OpenAPI document shows them.

The name pattern and length appear in the schema but are checked by the store,
whose refusal names the thing and the fix (a 400), rather than by a bare
"should match pattern" (422). Everything else a request body holds is checked
here, strictly: a number where a name goes, a string where a number goes,
infinities, NUL bytes and unknown fields are refused before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from streamboss.agent.config import DEFAULT_MAX_ATTEMPTS, MODES
from streamboss.agent.framing import FRAMINGS
from streamboss.agent.naming import MAX_ATTEMPTS_LIMIT, NAME_PATTERN
from streamboss.agent.retry import DEFAULT_RETRY_DELAY, RETRY_DELAY_MAX

from .model import DEFAULT_SEGMENT_BYTES
from .store import MIN_SEGMENT_BYTES
from .validation_text import one_line

# JSON Schema patterns are searched, not matched: anchored, as the store matches them.
NAME_REGEX = f"^{NAME_PATTERN.pattern}$"
NAME_SCHEMA: dict[str, Any] = {"pattern": NAME_REGEX, "minLength": 1, "maxLength": 63}
# Text a program or a header can carry: no NUL byte.
NO_NUL_REGEX = "^[^\\u0000]*$"
# Bounds that keep a declaration from asking the impossible of a machine or a
# broker (a million agents, a year-long timeout); far beyond what anyone needs.
MAX_AGENTS = 1000
MAX_TARGET_BACKLOG = 1_000_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_CONCURRENCY = 1024
MAX_TEXT = 4096
MAX_SEGMENT_BYTES = 1024 * 1024 * 1024
MAX_SEGMENT_SECONDS = 24 * 3600.0
MAX_STORE_URL = 1024


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not hold a NUL byte")
    return value


def _integral(value: Any) -> Any:
    """A float with no fraction as the int it is: JSON Schema counts 3.0 as an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


# Whole numbers in their ranges: 3.0 counts, "3" and true do not. (The bounds come
# before the validator, so the schema shows them as minimum and maximum.)
WHOLE = BeforeValidator(_integral)


Name = Annotated[str, Field(json_schema_extra=NAME_SCHEMA)]
Text = Annotated[str, Field(max_length=MAX_TEXT, json_schema_extra={"pattern": NO_NUL_REGEX}),
                 AfterValidator(_no_nul)]
Command = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, json_schema_extra={
    "pattern": "^[^\\u0000]*[^\\u0000\\s][^\\u0000]*$"}), AfterValidator(_no_nul)]
EnvName = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, json_schema_extra={
    "pattern": "^[^=\\u0000]+$"}), AfterValidator(_no_nul)]


def _env_name(value: str) -> str:
    if "=" in value:
        raise ValueError("an environment name must not hold '='")
    return value


STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def strict_with_examples(*examples: dict[str, Any]) -> ConfigDict:
    """STRICT, with examples for the document (and for schemathesis's examples phase)."""
    return ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                      json_schema_extra={"examples": list(examples)})


class ErrorOut(BaseModel):
    """Every refusal but a 422: one line naming the thing and the fix."""

    detail: str


# -- streams ------------------------------------------------------------------------------


class StreamIn(BaseModel):
    model_config = strict_with_examples({"name": "words"})
    name: Name


# -- process definitions -------------------------------------------------------------------


Attempts = Annotated[int, Field(ge=1, le=MAX_ATTEMPTS_LIMIT), WHOLE]
Concurrency = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY), WHOLE]
AgentCount = Annotated[int, Field(ge=0, le=MAX_AGENTS), WHOLE]
TargetBacklog = Annotated[int, Field(ge=1, le=MAX_TARGET_BACKLOG), WHOLE]
SegmentBytes = Annotated[int, Field(ge=MIN_SEGMENT_BYTES, le=MAX_SEGMENT_BYTES), WHOLE]
RetryDelay = Annotated[float, Field(ge=0.001, le=RETRY_DELAY_MAX)]


class DefinitionIn(BaseModel):
    """A process definition (agent/config.py parse_definition holds the rules). Names with
    '-' instead of '_' are accepted too (``max-attempts``)."""

    model_config = strict_with_examples({"exec": "tr a-z A-Z", "name": "upper"})

    exec: Command | Annotated[list[Text], Field(min_length=1, max_length=256)] = Field(
        description="the program and its arguments: a command line (split like a shell "
                    "would, or run by /bin/sh with shell) or a list, program first")
    name: Name | None = Field(default=None, description="required unless ?name= is given")
    application: Text | None = None
    mode: Literal[MODES] = "per-message"  # type: ignore[valid-type]
    framing: Literal[FRAMINGS] | None = None  # type: ignore[valid-type]
    output_framing: Literal[FRAMINGS] | None = None  # type: ignore[valid-type]
    output_framing_: Literal[FRAMINGS] | None = Field(  # type: ignore[valid-type]
        default=None, alias="output-framing")
    timeout: Annotated[float, Field(ge=0.001, le=MAX_SECONDS)] | None = Field(
        default=None, description="seconds per run; null for none (service mode)")
    max_attempts: Attempts = DEFAULT_MAX_ATTEMPTS
    max_attempts_: Attempts = Field(default=DEFAULT_MAX_ATTEMPTS, alias="max-attempts")
    retry_delay: RetryDelay = DEFAULT_RETRY_DELAY
    retry_delay_: RetryDelay = Field(default=DEFAULT_RETRY_DELAY, alias="retry-delay")
    env: dict[Annotated[EnvName, AfterValidator(_env_name)],
              Text | int | float | bool] | None = Field(
        default=None, description="the program's environment; values are shown masked")
    shell: bool | None = None
    concurrency: Concurrency | None = None
    image: Text | None = None


class SeedDefinitionIn(BaseModel):
    """The seed's registration form: the definition under ``definition``."""

    model_config = strict_with_examples(
        {"definition": {"exec": "tr [a-z] [A-Z]", "application": "demo", "name": "upper"}})
    definition: DefinitionIn


def check_definition_body(body: Any) -> dict[str, Any]:
    """``body`` as the schema reads it: only the fields given, whole numbers as ints.

    Raises:
        ValueError: the body breaks the schema (one line, naming the field).
    """
    seed = isinstance(body, dict) and isinstance(body.get("definition"), dict)
    model: type[BaseModel] = SeedDefinitionIn if seed else DefinitionIn
    try:
        checked = model.model_validate(body)
    except ValidationError as exc:
        raise ValueError(f"process definition: {one_line(exc.errors())}") from None
    return checked.model_dump(by_alias=True, exclude_unset=True)


def schema_components() -> dict[str, Any]:
    """Schemas routes refer to by name, for ``components/schemas`` of the OpenAPI
    document: the definition body (the definition routes read their body themselves)
    and the error body."""
    template = "#/components/schemas/{model}"
    components: dict[str, Any] = {}
    for model in (DefinitionIn, SeedDefinitionIn):
        schema = model.model_json_schema(ref_template=template)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    components["ErrorOut"] = ErrorOut.model_json_schema(ref_template=template)
    components["DefinitionBody"] = {"anyOf": [
        {"$ref": template.format(model="SeedDefinitionIn")},
        {"$ref": template.format(model="DefinitionIn")}]}
    return components


# -- operations ----------------------------------------------------------------------------


class PolicyIn(BaseModel):
    """A scaling policy; each field left out keeps its default (see ``streamboss
    create-operation --help``). ``min`` may not be above ``max``."""

    model_config = STRICT
    min: AgentCount | None = None
    max: AgentCount | None = None
    target_backlog_per_agent: TargetBacklog | None = None
    scale_out_cooldown: Annotated[float, Field(ge=0, le=MAX_SECONDS)] | None = None
    scale_in_cooldown: Annotated[float, Field(ge=0, le=MAX_SECONDS)] | None = None
    idle_seconds: Annotated[float, Field(ge=0, le=MAX_SECONDS)] | None = None
    warm_pool: Annotated[AgentCount, Field(description=(
        "AWS only: stopped instances kept ready so the operation wakes in seconds; "
        "at most max"))] | None = None


class OperationIn(BaseModel):
    model_config = strict_with_examples({"name": "shout", "definition": "upper",
                                         "input": "words", "output": "loud-words",
                                         "policy": {"max": 2}})
    name: Name
    definition: Annotated[str, Field(
        description="definition id or name (newest version)", json_schema_extra=NAME_SCHEMA)]
    input: Name
    output: Name
    policy: PolicyIn = Field(default_factory=PolicyIn)


# -- archives ------------------------------------------------------------------------------


class ArchiveIn(BaseModel):
    model_config = strict_with_examples({"stream": "words", "segment_seconds": 60})
    stream: Name
    store: Annotated[str, Field(min_length=1, max_length=MAX_STORE_URL, json_schema_extra={
        "pattern": "^(file|s3)://[^\\u0000]*$"}), AfterValidator(_no_nul)] | None = Field(
        default=None, description="URL prefix (file:///DIR or s3://BUCKET[/PREFIX]); default "
                                  "the manager's")
    segment_bytes: SegmentBytes | None = Field(
        default=None, description=f"roll a segment at this size [{DEFAULT_SEGMENT_BYTES}]")
    segment_seconds: Annotated[float, Field(ge=0.001, le=MAX_SEGMENT_SECONDS)] | None = Field(
        default=None, description="roll a segment this long after its first message [60]")


# -- errors --------------------------------------------------------------------------------


ERROR_DESCRIPTIONS = {
    400: "Refused: a bad name or declaration, or a Host this manager does not answer to",
    401: "Missing or wrong token",
    403: "A state-changing request from a web page of another origin",
    404: "No such stream, definition, operation or archive",
    409: "In conflict with what is declared (in use, exists, a cycle, refused by the broker)",
    413: "Request body over the limit",
    503: "The broker or the declaration store cannot be reached now: try again",
}


ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the given error statuses, each with the one-line error body.

    The content type is spelled out: FastAPI would give an error the media type of
    the route's own answer (text/plain for the graph), but refusals are JSON.
    """
    return {code: {"description": ERROR_DESCRIPTIONS[code],
                   "content": {"application/json": {"schema": ERROR_REF}}}
            for code in codes}


# What any route may answer (Host), what any route behind the token may answer, and what
# any state-changing one may answer (Origin, body limit) besides.
PUBLIC = (400,)
READ = (400, 401)
WRITE = (400, 401, 403, 413)

