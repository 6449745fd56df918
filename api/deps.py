"""Dependencies injected into routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from infra.settings import Settings
from ranker.service import Recommender


def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
