"""GET /health and /v1/models: the server is up, and the one model it serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .handling import ServeSettings, settings_of
from .schemas import APIError

router = APIRouter()


def model_card(settings: ServeSettings) -> dict:
    return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "palm"}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(settings_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    settings = settings_of(request)
    if model_id != settings.model_name:
        raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{settings.model_name}'",
                       "model", "model_not_found")
    return model_card(settings)
