"""The project config as a Dagster resource, so a run can point at another config or override fields."""

import json

from dagster import ConfigurableResource

from fineinstructions_core.config import Config, load_config


class FineInstructionsResource(ConfigurableResource):
    """`config_path` empty means FI_CONFIG or ./fineinstructions.yaml; `overrides` is a JSON object."""

    config_path: str = ""
    overrides: str = ""

    def load(self) -> Config:
        return load_config(self.config_path or None, json.loads(self.overrides) if self.overrides else None)
