"""Environments that inject faults on purpose, for the end-to-end failure tests."""
import os

from envs.token_match import TokenMatchEnv


class KillsItsActor(TokenMatchEnv):
    """Ends the actor's whole process (as an OOM kill would) at the first step."""

    def step(self, messages):
        os._exit(17)
