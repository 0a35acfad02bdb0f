"""The `runpod` worker's rules, in milliseconds: how long it waits after failed status polls, and what a
finished RunPod job means for its flow run. The worker end to end is in test_runpod.py."""

from __future__ import annotations

import pytest

from workers.runpod import MAX_POLL_BACKOFF_S, RunPodJobConfiguration, _outcome, backoff

pytestmark = pytest.mark.fast


def test_the_delay_after_failed_polls_doubles_up_to_the_cap_and_never_drops_under_the_interval():
    delays = [2.0]
    for _ in range(6):
        delays.append(backoff(delays[-1], 2.0))
    assert delays == [2.0, 4.0, 8.0, 16.0, MAX_POLL_BACKOFF_S, MAX_POLL_BACKOFF_S, MAX_POLL_BACKOFF_S]
    assert backoff(60.0, 60.0) == 60.0  # an interval above the cap is kept


CONFIG = RunPodJobConfiguration(endpoint_id="e", execution_timeout_s=600)
NOT_RUN = "RunPod job j COMPLETED without running the flow run: "
NO_EXIT_CODE = "; check that the endpoint runs this project's image (handler.py)"


@pytest.mark.parametrize("status, code, end, message", [
    ({"status": "COMPLETED", "output": {"exit_code": 0}}, 0, None, None),
    ({"status": "COMPLETED", "output": {"exit_code": 1}}, 1, None, None),  # the flow run reported its own end
    ({"status": "COMPLETED", "output": {"status": "error", "error": "`input.command`: no"}}, 1, "FAILED",
     NOT_RUN + "the handler refused it: `input.command`: no"),
    ({"status": "COMPLETED", "output": {"error": "`input` must be an object"}}, 1, "FAILED",
     NOT_RUN + "the handler refused it: `input` must be an object"),
    ({"status": "COMPLETED", "output": {"exit_code": True}}, 1, "FAILED",
     NOT_RUN + "the handler returned no exit code ('{\"exit_code\": true}')" + NO_EXIT_CODE),
    ({"status": "COMPLETED"}, 1, "FAILED", NOT_RUN + "the handler returned no exit code ('null')" + NO_EXIT_CODE),
    ({"status": "FAILED", "error": "handler exited 137"}, 1, "CRASHED", "RunPod job j FAILED: handler exited 137"),
    ({"status": "TIMED_OUT"}, 124, "CRASHED", "RunPod job j TIMED_OUT: execution timeout of 600 s"),
])
def test_what_a_finished_job_means_for_its_flow_run(status, code, end, message):
    exit_code, state = _outcome("j", status, CONFIG)
    assert exit_code == code
    assert (state.type.value, state.message) == (end, message) if state is not None else end is None
