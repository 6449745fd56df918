"""DELETE /users/{user_id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from privads.api.deps import KEY_RESPONSES, RecommenderDep, WriteAccess

router = APIRouter(tags=["users"])


# ``:path``: an id may hold "/" (``/recommend`` accepts any 1-128 characters), sent percent-encoded as %2F, which the
# server decodes before routing; without it such a user could never be erased
@router.delete("/users/{user_id:path}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               dependencies=[WriteAccess],
               responses={**KEY_RESPONSES, 503: {"description": "Redis is unreachable, or full (at its maxmemory it "
                                                 "refuses writes): nothing was erased; retry after Retry-After"}})
async def erase_user(
    user_id: Annotated[str, Path(min_length=1, max_length=128)], recommender: RecommenderDep
) -> Response:
    """Erase every learned trace of a user."""
    await recommender.erase_user(user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
