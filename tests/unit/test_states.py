import pytest

from cloudml_os.states import FINAL_STATES, InvalidTransition, JobState, check_transition


@pytest.mark.parametrize("current, new", [
    (JobState.QUEUED, JobState.PREPARING),
    (JobState.QUEUED, JobState.CANCELLED),
    (JobState.PREPARING, JobState.RUNNING),
    (JobState.PREPARING, JobState.CANCELLING),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLING),
    (JobState.CANCELLING, JobState.CANCELLED),
])
def test_the_v1_lifecycle_is_allowed(current, new):
    check_transition(current, new)


@pytest.mark.parametrize("current, new", [
    (JobState.RUNNING, JobState.QUEUED),
    (JobState.SUCCEEDED, JobState.RUNNING),
    (JobState.CANCELLED, JobState.QUEUED),
    (JobState.CANCELLING, JobState.SUCCEEDED),
    (JobState.QUEUED, JobState.RUNNING),
])
def test_a_job_never_moves_backwards_or_skips_preparing(current, new):
    with pytest.raises(InvalidTransition):
        check_transition(current, new)


def test_final_states_have_no_way_out():
    for state in FINAL_STATES:
        assert state.is_final
        for new in JobState:
            with pytest.raises(InvalidTransition):
                check_transition(state, new)
