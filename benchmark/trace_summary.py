"""Reading a ``jax.profiler`` trace: device time per kernel, the device's idle gaps, host threads.

Three views of one trace directory, used by ``profile_kernels.py`` and ``profile_throughput.py
--trace``:

- ``kernel_totals``: per GPU stream and XLA module, the kernels with the most device time;
- ``device_gaps``: the union of all kernels' intervals against the traced wall span, and every
  idle gap longer than ``min_gap_us`` attributed to the pair (module before, module after), so
  one sees whether the device waits between chained decode calls, around prefill calls, or
  inside a call;
- ``host_threads``: per host thread, the trace events with the most time (the XLA runtime's
  execute, thunk and wait events show where a thread blocks).

GPU only in practice: on a CPU the trace has no device plane (the functions then return nothing).
As a command, it reads a trace kept by ``profile_throughput.py --trace DIR`` (e.g. one copied back
from the GPU machine): ``python benchmark/trace_summary.py DIR --top 40 --kernels``.
"""
from __future__ import annotations

import collections
import glob
import os


def load(trace_dir: str):
    from jax.profiler import ProfileData
    path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
    return ProfileData.from_file(path)


def module_of(event) -> str:
    """The XLA module (executable) a kernel event belongs to, where the trace says."""
    for key, value in event.stats:
        if key in ('hlo_module', 'hlo_module_name'):
            return str(value)
    return ''


def _device_lines(data):
    for plane in data.planes:
        if plane.name.startswith('/device:GPU'):
            for line in plane.lines:
                yield plane.name, line


def kernel_totals(data, top: int) -> dict:
    """{'plane line [module]': {'busy_us', 'top': [(kernel, count, total_us), ...]}}."""
    groups = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    for plane_name, line in _device_lines(data):
        for event in line.events:
            entry = groups[f'{plane_name} {line.name} [{module_of(event)}]'][event.name]
            entry[0] += 1
            entry[1] += event.duration_ns / 1e3
    out = {}
    for group, totals in groups.items():
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
        out[group] = {'busy_us': sum(t for _, (_, t) in ranked),
                      'top': [(name[:110], n, round(t, 1)) for name, (n, t) in ranked[:top]]}
    return out


def _gpu0_events(data) -> list[tuple]:
    """GPU 0's kernels and copies on every stream as (start_ns, end_ns, stream line, event), by start."""
    return sorted(((e.start_ns, e.start_ns + e.duration_ns, line.name, e) for plane_name, line in _device_lines(data)
                   if plane_name.startswith('/device:GPU:0') and line.name.startswith('Stream') for e in line.events),
                  key=lambda event: event[:2])


def _idle_gaps(events: list[tuple]) -> list[tuple]:
    """The stretches no event of ``events`` (``_gpu0_events``) covers, as (index of the event after
    the stretch, its start ns, its end ns, the event that ended last before it)."""
    gaps, end, last = [], events[0][1], events[0]
    for i, event in enumerate(events[1:], 1):
        if event[0] > end:
            gaps.append((i, end, event[0], last))
        if event[1] >= end:
            end, last = event[1], event
    return gaps


def device_gaps(data, min_gap_us: float = 20.0) -> dict:
    """Wall span, busy time (union over every stream of the first device) and idle gaps.

    ``gaps``: {'module before -> module after': [count, total_ms]}, gaps of at least
    ``min_gap_us``; shorter ones (launch latency inside a call) are summed in ``small_gaps_ms``. A
    kernel the trace gives no module (those of command buffers) is named by itself instead."""
    events = _gpu0_events(data)
    if not events:
        return {}

    def label(event):
        return module_of(event[3]) or event[3].name[:48]
    idle = _idle_gaps(events)
    small = sum(stop - start for _, start, stop, _ in idle if stop - start < min_gap_us * 1e3) / 1e6
    gaps = collections.defaultdict(lambda: [0, 0.0])
    for i, start, stop, before in idle:
        if stop - start >= min_gap_us * 1e3:
            entry = gaps[f'{label(before)} -> {label(events[i])}']
            entry[0] += 1
            entry[1] += (stop - start) / 1e6
    busy = max(e[1] for e in events) - events[0][0] - sum(stop - start for _, start, stop, _ in idle)
    span = events[-1][1] - events[0][0]
    return {'span_ms': round(span / 1e6, 1), 'busy_ms': round(busy / 1e6, 1),
            'idle_ms': round((span - busy) / 1e6, 1), 'small_gaps_ms': round(small, 1),
            'gaps': {k: [n, round(t, 1)] for k, (n, t) in sorted(gaps.items(), key=lambda kv: -kv[1][1])}}


def host_threads(data, top: int = 12, min_share: float = 0.02) -> dict:
    """{thread line: [(event, count, total_ms), ...]} for host threads whose events add up to at
    least ``min_share`` of the busiest thread's (nested events count in each of their parents)."""
    lines = {}
    for plane in data.planes:
        if plane.name != '/host:CPU':
            continue
        for line in plane.lines:
            totals = collections.defaultdict(lambda: [0, 0.0])
            for event in line.events:
                entry = totals[event.name[:90]]
                entry[0] += 1
                entry[1] += event.duration_ns / 1e6
            if totals:
                lines[line.name] = totals
    if not lines:
        return {}
    heaviest = max(max(t for _, t in totals.values()) for totals in lines.values())
    out = {}
    for name, totals in lines.items():
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
        if ranked[0][1][1] >= min_share * heaviest:
            out[name] = [(event, n, round(t, 1)) for event, (n, t) in ranked[:top]]
    return out


def around_a_gap(data, min_gap_us: float = 100.0, context: int = 10) -> dict:
    """What surrounds one idle gap of GPU 0 of at least ``min_gap_us`` (the middle one of the
    trace): the ``context`` kernels before and after it on any stream, and the host events of at
    most 1 ms that overlap it, each as (start us from the gap's start, duration us, line, name). Says
    whether the device waited for the host (a launch ending at the gap's end) or for a stream."""
    kernels = _gpu0_events(data)
    gaps = [gap for gap in _idle_gaps(kernels) if gap[2] - gap[1] >= min_gap_us * 1e3] if kernels else []
    if not gaps:
        return {}
    index, gap_start, gap_end, _ = gaps[len(gaps) // 2]
    host = [(e.start_ns, e.start_ns + e.duration_ns, line.name, e) for plane in data.planes
            if plane.name == '/host:CPU' for line in plane.lines for e in line.events if e.duration_ns <= 1e6]

    def row(event):
        return (round((event[0] - gap_start) / 1e3, 1), round((event[1] - event[0]) / 1e3, 1), event[2],
                event[3].name[:70])
    return {'gap_us': round((gap_end - gap_start) / 1e3, 1), 'gaps': len(gaps),
            'kernels': [row(k) for k in kernels[max(index - context, 0):index + context]],
            'host': [row(h) for h in sorted(host, key=lambda event: event[:2])
                     if h[1] >= gap_start - 50e3 and h[0] <= gap_end + 10e3][:40]}


def print_gaps_and_threads(data, top: int = 12) -> None:
    """The idle-gap summary and the host threads, as ``profile_*`` scripts print them."""
    gaps = device_gaps(data)
    if gaps:
        print(f"device: span {gaps['span_ms']} ms, busy {gaps['busy_ms']} ms, idle {gaps['idle_ms']} ms "
              f"(gaps under 20 us: {gaps['small_gaps_ms']} ms)")
        for pair, (n, ms) in list(gaps['gaps'].items())[:top]:
            print(f'   {ms:10.1f} ms {n:6d}x  {pair}')
    around = around_a_gap(data)
    if around:
        print(f"one of {around['gaps']} gaps >= 100 us ({around['gap_us']} us), from its start (us, duration):")
        for label, rows in (('kernel', around['kernels']), ('host', around['host'])):
            for offset, duration, line, name in rows:
                print(f'   {label:6s} {offset:9.1f} {duration:8.1f}  {line[:28]:28s} {name}')
    for thread, events in host_threads(data, top).items():
        print(f'-- host thread {thread}')
        for event, n, ms in events:
            print(f'   {ms:10.1f} ms {n:7d}x  {event}')


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description='Summarise a kept jax.profiler trace (profile_throughput.py '
                                                 '--trace DIR): device idle gaps, host threads, kernels.')
    parser.add_argument('trace_dir')
    parser.add_argument('--top', type=int, default=12, help='entries per host thread and per kernel group')
    parser.add_argument('--kernels', action='store_true', help='also the kernels with the most device time')
    args = parser.parse_args()
    data = load(args.trace_dir)
    print_gaps_and_threads(data, args.top)
    if args.kernels:
        for group, entry in kernel_totals(data, args.top).items():
            print(f"-- {group}: busy {entry['busy_us'] / 1e3:.1f} ms")
            for name, n, us in entry['top']:
                print(f'   {us / 1e3:10.1f} ms {n:7d}x  {name}')


if __name__ == '__main__':
    main()
