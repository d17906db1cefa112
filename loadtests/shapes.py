"""The locust adapter of ``loadtests.scenarios``: picks the plan named by ``--scenario`` on the
first tick and stops the test when the plan runs out."""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.scenarios import Stage, plan_from_options, stage_at


class ScenarioShape(LoadTestShape):
    # steady reads -u, -r and --run-time; step and spike have their own options.
    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[Stage] | None = None

    def tick(self) -> tuple[int, float] | None:
        if self.plan is None:
            assert self.runner is not None
            self.plan = plan_from_options(self.runner.environment.parsed_options)
        stage = stage_at(self.plan, self.get_run_time())
        return None if stage is None else (stage.users, stage.spawn_rate)
