"""``Annotated`` dependency aliases: routes declare what they need, the app factory decides what it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request

from gateway.metrics import Metrics
from gateway.pipeline.coco import ModelInfo
from gateway.predictor import Predictor
from gateway.settings import Settings


class ReadinessProbe(Protocol):
    """Answers whether the model can take requests now (bounded time, never raises)."""

    async def model_ready(self) -> bool: ...


@dataclass(slots=True)
class Services:
    """Collaborators the app factory assembles; tests swap any of them."""

    settings: Settings
    metrics: Metrics
    model: ModelInfo
    predictor: Predictor
    readiness: ReadinessProbe


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_predictor(request: Request) -> Predictor:
    return get_services(request).predictor


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
