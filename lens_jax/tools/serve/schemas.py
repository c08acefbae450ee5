"""Request and response bodies of the service (pydantic): the OpenAI images API plus Lens' own fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..jobs import MAX_SEED

MAX_PROMPT_CHARS = 4000
MAX_LORA_MULTIPLIER = 4.0  # |multiplier| of one LoRA in a request
MAX_LORAS = 4  # LoRAs in one request


class LoraRef(BaseModel):
    """One LoRA of a request: `name` (a file stem of the server's --lora-dir) and its multiplier."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    multiplier: float = Field(1.0, ge=-MAX_LORA_MULTIPLIER, le=MAX_LORA_MULTIPLIER, allow_inf_nan=False)


def _lora_short_form(item):
    """'name' or 'name:mult' -> {"name", "multiplier"}; other items unchanged (pydantic checks them)."""
    if not isinstance(item, str):
        return item
    name, sep, mult = item.rpartition(":")
    if not sep:
        return {"name": item}
    try:
        return {"name": name, "multiplier": float(mult)}
    except ValueError:
        raise ValueError(f"LoRA {item!r}: write 'name' or 'name:multiplier', e.g. 'style:0.8'.") from None


# Numbers and flags are strict: true is not n=1, "3" is not 3 steps, "yes" does not turn streaming on.
class GenerationRequest(BaseModel):
    """`POST /v1/images/generations`. OpenAI fields: prompt, n, size ("WxH"), response_format, model, user.
    Lens fields: negative_prompt, seed (image i gets seed + i), steps, guidance, variant, aspect_ratio,
    lora (LoRAs of the server's --lora-dir with multipliers), stream (answer as Server-Sent Events:
    queued, progress, then the result), request_id (your id for GET /v1/progress/{id})."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, strict=True, description="images for this prompt (at most the server's max batch)")
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="'WIDTHxHEIGHT', multiples of 16")
    aspect_ratio: str | None = Field(None, max_length=8, description="e.g. '16:9' (instead of size)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    steps: int | None = Field(None, ge=1, le=200, strict=True)
    guidance: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False, strict=True)
    variant: Literal["lens", "lens-base", "lens-turbo"] | None = None
    lora: list[LoraRef] | None = Field(None, max_length=MAX_LORAS,
                                       description="[{name, multiplier}] or ['name:mult'] from GET /v1/loras")
    stream: bool = Field(False, strict=True)
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{8,64}$",
                                   description="the id for GET /v1/progress/{id} (default: a random one)")
    model: str | None = Field(None, max_length=200, description="accepted for OpenAI clients; ignored")
    user: str | None = Field(None, max_length=200, description="accepted for OpenAI clients; ignored")

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_items(cls, value):
        if isinstance(value, str):
            value = [value]
        return [_lora_short_form(v) for v in value] if isinstance(value, list) else value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int
    revised_prompt: str | None = None


class Settings(BaseModel):
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int
    variant: str | None
    lora: list[LoraRef] | None = None


class GenerationResponse(BaseModel):
    id: str
    created: int
    data: list[ImageData]
    settings: Settings
