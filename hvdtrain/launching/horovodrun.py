"""horovodrun for elastic jobs: ``python -m hvdtrain.launching.horovodrun ARGS`` runs ``horovodrun ARGS`` (its own code) with
two fixes and one addition, for Horovod 0.28.1's elastic driver.

1. The interface. The driver picks the interface of its rendezvous server once, at the start; when every host it
   starts with is this machine it keeps only interfaces holding 127.0.0.1 (driver_service.get_local_interfaces),
   even when --network-interface names another: a job started on the launching host alone could never take in a
   host that joins later. Here the interfaces named by --network-interface are taken as given (hvdtrain's
   preflight has checked this machine and every listed host for them); without the option Horovod's choice stands.
2. A worker that neither rejoins nor exits (stopped or frozen on a host that is otherwise up: SIGSTOP, a hung file
   system) no longer holds the job forever. The driver re-forms the world only when every worker of the old one
   has reported at the rendezvous or exited. Here, once the first worker of a round has reported, those still
   missing --elastic-timeout seconds later, plus Gloo's collective timeout (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 by
   default: how long live workers may take to notice that a peer is gone), are ended the way the driver ends a
   blacklisted host's workers: their exit counts as a failure, the host is blacklisted, the others go on.
3. SIGUSR1/SIGUSR2 (a scheduler's warning before preemption or the time limit; run_job passes them on to the
   launcher) go to this machine's rank wrappers, which pass them to the workers: horovodrun has no handler for
   them and would die of them. The preemption vote is summed over all ranks, so a warning that reaches this
   machine's workers stops every worker after the same step. (Remote workers' wrappers sit behind ssh clients,
   which must not get the signal: it would end their session.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from hvdtrain.launching.rank import signal_wrappers


def pass_on(signum: int, _frame=None) -> None:
    """Send `signum` to every rank wrapper under this process."""
    signal_wrappers(signum)


def gloo_timeout() -> int:
    """Seconds a Gloo collective waits for a peer (Horovod's HOROVOD_GLOO_TIMEOUT_SECONDS, default 30)."""
    value = os.environ.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "")
    return int(value) if value.isdigit() else 30


def end_missing_workers(registry, round_id: int, waited: float) -> None:
    """`waited` s after the first report of round `round_id`: if it still waits for workers, end them."""
    with registry._lock:
        if registry._rendezvous_id != round_id or len(registry._states) >= registry._size:
            return
        driver = registry._driver
        missing = [
            (host, slot.local_rank)
            for host, slots in driver.host_assignments.items()
            for slot in slots
            if (host, slot.local_rank) not in registry._states
        ]
    for host in sorted({host for host, _ in missing}):
        slots = ", ".join(f"{host}[{slot}]" for h, slot in missing if h == host)
        print(
            f"hvdtrain: worker {slots} neither rejoined nor exited within {waited:g} s (--elastic-timeout "
            f"{driver._timeout} s + Gloo's timeout) after the others reported (stopped or frozen?): ending it",
            file=sys.stderr,
            flush=True,
        )
        driver._host_manager._hosts_state[host].set_event()  # what terminates a blacklisted host's workers


def bound_rendezvous_rounds() -> None:
    """Patch Horovod's WorkerStateRegistry: the first report of each round starts a timer of the elastic
    timeout, after which the workers still missing are ended (end_missing_workers)."""
    from horovod.runner.elastic.registration import WorkerStateRegistry

    record_state = WorkerStateRegistry._record_state

    def _record_state(self, host, slot, state):
        with self._lock:
            first = not self._states and not self._driver.finished()
            round_id = self._rendezvous_id
        if first:
            bound = self._driver._timeout + gloo_timeout()
            timer = threading.Timer(bound, end_missing_workers, (self, round_id, bound))
            timer.daemon = True
            timer.start()
        return record_state(self, host, slot, state)

    WorkerStateRegistry._record_state = _record_state


def main() -> None:
    from horovod.runner.driver import driver_service
    from horovod.runner.launch import run_commandline

    bound_rendezvous_rounds()

    for s in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, pass_on)

    horovods_choice = driver_service.get_local_interfaces

    def local_interfaces(settings):
        return set(settings.nics) if settings.nics else horovods_choice(settings)

    driver_service.get_local_interfaces = local_interfaces
    run_commandline()


if __name__ == "__main__":
    main()
