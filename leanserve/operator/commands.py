"""`leanserve operator`: run the kopf operator against the current kubeconfig."""

from __future__ import annotations

import asyncio
import logging

from leanserve.operator.runner import login, make_runtime, run_operator
from leanserve.operator.settings import load_settings


def operator_command(*, namespace: str | None) -> None:
    settings = load_settings()
    login()  # fail with one clear line before kopf starts retrying in the background
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run_operator(make_runtime(settings), namespace=namespace))
