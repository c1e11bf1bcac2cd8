"""Dependency aliases: the settings and the backend live in the app's lifespan state."""

from typing import Annotated

from fastapi import Depends, Request

from .backends import Backend
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


SettingsDep = Annotated[Settings, Depends(get_settings)]
BackendDep = Annotated[Backend, Depends(get_backend)]
