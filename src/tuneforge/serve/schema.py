"""The job request: the serverless worker's shape (seed 001) or a native tuneforge config.

    {"input": {"user_id", "model_id", "run_id", "credentials": {"wandb_api_key", "hf_token"}, "args": {axolotl keys}}}
    {"config": {tuneforge config}, "run_id": "...", "credentials": {...}}

Both become a `JobSpec`: a tuneforge config (validated, paths confined to the user's workspace), the
import report, and credentials that only ever live in memory and in the job's environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CREDENTIAL_ENV = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wandb_api_key: Optional[str] = Field(None, max_length=4096, description="Weights & Biases key (job env WANDB_API_KEY).")
    hf_token: Optional[str] = Field(None, max_length=4096, description="Hugging Face token (job env HF_TOKEN).")

    def env(self) -> dict[str, str]:
        return {CREDENTIAL_ENV[k]: v for k, v in self.model_dump().items() if v}


class SeedInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Optional[str] = Field(None, max_length=64, description="Must match the token's user when given.")
    model_id: Optional[str] = Field(None, max_length=128, description="A label for the trained model.")
    run_id: Optional[str] = Field(None, max_length=256, description="Names the run folder; unique per user (letters, digits, . _ -).")
    credentials: Credentials = Field(default_factory=Credentials, description="Secrets for the job's environment only (never stored).")
    args: dict[str, Any] = Field(description="axolotl-style training arguments.")


class SeedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: SeedInput = Field(description="The serverless worker's request: user, run, credentials and axolotl args.")


class NativeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] = Field(description="A tuneforge config (model, data, train, ...).")
    run_id: Optional[str] = Field(None, max_length=256, description="Names the run folder; unique per user (letters, digits, . _ -).")
    model_id: Optional[str] = Field(None, max_length=128, description="A label for the trained model.")
    credentials: Credentials = Field(default_factory=Credentials, description="Secrets for the job's environment only (never stored).")


class CredentialsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credentials: Credentials = Field(description="Secrets a job waiting for credentials runs with (memory only).")


class RequestError(Exception):
    """A bad request: HTTP `status` with a list of {loc, msg} (loc = dotted field path)."""

    def __init__(self, status: int, errors: list[dict[str, str]], headers: dict[str, str] | None = None):
        super().__init__(errors[0]["msg"] if errors else "bad request")
        self.status, self.errors, self.headers = status, errors, headers or {}


def refuse(status: int, loc: str, msg: str, headers: dict[str, str] | None = None) -> RequestError:
    """One bad field: HTTP `status`, its dotted place `loc`, and one line saying why and what to do."""
    return RequestError(status, [{"loc": loc, "msg": msg}], headers)


@dataclass
class JobSpec:
    config: dict[str, Any]
    run_id: Optional[str]
    model_id: Optional[str]
    kind: str  # "seed" or "native"
    credentials: dict[str, str] = field(default_factory=dict)  # env var -> value; memory only
    report: list[dict[str, Any]] = field(default_factory=list)


def pydantic_errors(exc: ValidationError, prefix: tuple = ()) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (*prefix, *err["loc"]))
        out.append({"loc": loc, "msg": err["msg"].removeprefix("Value error, "), "type": err["type"]})
    return out


def parse_request(body: Any, user: str) -> JobSpec:
    """Validate the request's shape and translate it; raise RequestError(422/403) naming the field."""
    if not isinstance(body, dict) or not ({"input", "config"} & set(body)):
        raise RequestError(422, [{"loc": "body", "msg": "expected {\"input\": {...}} (worker request) or {\"config\": {...}} (tuneforge config)"}])
    refuse_expansion(body)
    if "input" in body:
        try:
            req = SeedRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestError(422, pydantic_errors(exc)) from None
        inp = req.input
        if inp.user_id not in (None, "", user):
            raise RequestError(403, [{"loc": "input.user_id", "msg": f"this token acts as {user!r}, not {inp.user_id!r}"}])
        from tuneforge.config.importers import translate
        from tuneforge.errors import UserError

        try:
            result = translate(inp.args, "axolotl", "input.args")
        except UserError as exc:
            raise RequestError(422, [{"loc": "input.args", "msg": str(exc)}]) from None
        rejected = [{"loc": f"input.args.{r['key']}", "msg": r["note"]} for r in result.report()
                    if r["status"] == "not mapped" and r["note"].startswith("value not accepted")]
        if rejected:  # a known key with a wrong value is an error here, not a silent fallback to the default
            raise RequestError(422, rejected)
        creds = {**result.env, **inp.credentials.env()}  # secrets found inside args move to the environment too
        return JobSpec(result.config, inp.run_id, inp.model_id, "seed", creds, result.report())
    try:
        req = NativeRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(422, pydantic_errors(exc)) from None
    return JobSpec(req.config, req.run_id, req.model_id, "native", req.credentials.env())


def refuse_expansion(body: dict[str, Any]) -> None:
    """`${` anywhere in a request (credentials aside) is a 422 naming its place: a job expands nothing, so the
    server's environment never reaches a job through a value (the seed's args included, mapped or not)."""
    from tuneforge.config.confine import GuestError, refuse_variables

    for top in ("input", "config"):
        node = body.get(top)
        if isinstance(node, dict):
            node = {k: v for k, v in node.items() if k != "credentials"}
        try:
            refuse_variables(node, top)
        except RecursionError:
            raise refuse(422, top, "nested too deeply to be a job (check the brackets)") from None
        except GuestError as exc:
            raise refuse(exc.status, exc.loc, exc.msg) from None


def validate_config(raw: dict[str, Any], loc_prefix: str):
    """The tuneforge schema's verdict (the validated Config), or 422 errors with the full field path."""
    from tuneforge.config.schema import Config

    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise RequestError(422, pydantic_errors(exc, (loc_prefix,) if loc_prefix else ())) from None
