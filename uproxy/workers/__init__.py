"""`--workers N`: one control process, N worker processes serving connections.

The control process keeps everything that decides (source, tracker, sync
runner, Proxier, rules, web servers, the listener pool with its port and IP
allocators). Workers only move bytes:

- Every listener is N sockets with SO_REUSEPORT on one address, bound by the
  control process (so bind errors and allocation stay where they were). A
  classic-BPF program (uproxy.reuseport) picks the socket from the client's
  source IP, so one client always reaches one worker and ClientIP affinity,
  kept per worker, holds. Socket i goes to worker i over a Unix socketpair
  (SCM_RIGHTS). The control process keeps its own copy of every socket: a
  worker that dies leaves its socket open (queued connections wait instead
  of being reset, and the kernel's numbering of the group does not shift)
  until the restarted worker gets it again.
- The plan reaches workers as messages on the same socketpair: per service
  port its endpoints and affinity timeout, and when external traffic has its
  own endpoints those and the cluster IPs (`port`, `forget`), and per
  listener which socket serves it (`open`, `close`, `abort`); `stop` drains
  and exits. Workers keep their own Balancer.
- Workers send their counters back every second (only ports that changed)
  and when they exit; the control process adds the differences into the
  pool's PortStats, so /metrics and /status show the sums. A worker that dies
  takes its open connections with it: its share of the active gauges is
  taken back out.

Modules: `messages` (typed, frozen; JSON on the wire), `channel` (frames
with descriptors over the socketpair; a sans-io decoder), `supervisor` (the
control side: WorkerGroup, SharedServer), `worker` (a worker process).
"""

from uproxy.workers.supervisor import SharedServer, WorkerGroup

__all__ = ["SharedServer", "WorkerGroup"]
