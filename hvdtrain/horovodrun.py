"""horovodrun for elastic jobs: ``python -m hvdtrain.horovodrun ARGS`` runs ``horovodrun ARGS`` with one fix.

Horovod 0.28.1's elastic driver picks the interface of its rendezvous server once, at the start. When every host
it starts with is this machine it keeps only interfaces holding 127.0.0.1 (driver_service.get_local_interfaces),
even when --network-interface names another, and fails without one: a job that starts on the launching host
alone could then never take in a host that joins later, since nothing else reaches 127.0.0.1. Here the interfaces
named by --network-interface are taken as given (hvdtrain's preflight has checked that this machine and every
listed host have them); without the option Horovod's own choice stands.

And one addition: SIGUSR1/SIGUSR2 (a scheduler's warning before preemption or the time limit; hvdtrain run_job
passes them on to the launcher) go to the rank wrappers of this machine's workers, which pass them to the
workers: horovodrun itself has no handler for them and would die of them, taking the job down. The workers'
preemption vote is summed over all ranks, so a warning that reaches this machine's workers stops every worker
after the same step. (Remote workers' wrappers sit behind ssh clients, which must not get the signal: it would
end their session.)
"""

from __future__ import annotations

import signal

WRAPPER = "hvdtrain.rank"


def pass_on(signum: int, _frame=None) -> None:
    """Send `signum` to every rank wrapper under this process (found by its command line)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if WRAPPER in p.cmdline():
                p.send_signal(signum)
        except psutil.Error:
            continue


def main() -> None:
    from horovod.runner.driver import driver_service
    from horovod.runner.launch import run_commandline

    for s in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, pass_on)

    horovods_choice = driver_service.get_local_interfaces

    def local_interfaces(settings):
        return set(settings.nics) if settings.nics else horovods_choice(settings)

    driver_service.get_local_interfaces = local_interfaces
    run_commandline()


if __name__ == "__main__":
    main()
