"""Request and response bodies of the service (pydantic): the OpenAI images API plus Lens' own fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**31 - 1


class GenerationRequest(BaseModel):
    """`POST /v1/images/generations`. OpenAI fields: prompt, n, size ("WxH"), response_format, model, user.
    Lens fields: negative_prompt, seed (image i gets seed + i), steps, guidance, variant, aspect_ratio,
    stream (answer as Server-Sent Events: queued, progress, then the result)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, description="images for this prompt (at most the server's max batch)")
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="'WIDTHxHEIGHT', multiples of 16")
    aspect_ratio: str | None = Field(None, max_length=8, description="e.g. '16:9' (instead of size)")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, le=200)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    variant: Literal["lens", "lens-base", "lens-turbo"] | None = None
    stream: bool = False
    model: str | None = Field(None, max_length=200, description="accepted for OpenAI clients; ignored")
    user: str | None = Field(None, max_length=200, description="accepted for OpenAI clients; ignored")


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


class GenerationResponse(BaseModel):
    id: str
    created: int
    data: list[ImageData]
    settings: Settings
