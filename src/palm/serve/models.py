"""GET /health and /v1/models: the server is up, and the models it serves (the base, then each adapter)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .handling import ServeSettings, settings_of
from .schemas import APIError

router = APIRouter()


def model_card(settings: ServeSettings, name: str) -> dict:
    card = {"id": name, "object": "model", "created": settings.created, "owned_by": "palm"}
    if name != settings.model_name:
        card.update(root=name, parent=settings.model_name)  # a LoRA adapter on the base, as vLLM lists one
    return card


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    settings = settings_of(request)
    return {"object": "list", "data": [model_card(settings, name) for name in settings.model_names]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    settings = settings_of(request)
    if model_id not in settings.model_names:
        raise APIError(
            404,
            f"the model '{model_id}' does not exist; this server serves {', '.join(map(repr, settings.model_names))}",
            "model",
            "model_not_found",
        )
    return model_card(settings, model_id)
