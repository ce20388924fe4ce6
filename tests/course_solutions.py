"""Reference solutions of the course's exercises (kept with the tests, not in
the package or the committed notebooks). Each entry replaces the source of the
exercise cell tagged with its id; every solution *measures* on the live guest
where the question is about the guest, like a learner should."""

SOLUTIONS = {
    "ex0.1": 'answer = vm.describe()["kernel_release"]',
    "ex1.1": 'answer = next(ns.mode for ns in lab.namespaces() if ns.chardev)\nrecord("ex1.1", answer)',
    "ex1.2": 'answer = lab.namespaces()[0].size // 2**20\nrecord("ex1.2", answer)',
    "ex2.1": 'answer = [m.fs for m in mounts if m.experimental_warning]\nrecord("ex2.1", answer)',
    "ex2.2": 'answer = int(lab.sh("getconf PAGESIZE").stdout)\nrecord("ex2.2", answer)',
    "ex3.1": 'answer = next(r for r in results if r.memory == "fsdax-xfs").errname\nrecord("ex3.1", answer)',
    "ex3.2": 'answer = [r.memory for r in results if r.ok]\nrecord("ex3.2", answer)',
    "ex3.3": ('import re\nanswer = re.search(r"<- (\\w+)\\)", refused[0].trace[0]).group(1)\n'
              'record("ex3.3", answer)'),
    "ex4.1": 'answer = results[0].foll_pin_delta\nrecord("ex4.1", answer)',
    "ex4.2": 'answer = results[0].vmpin_kb_delta\nrecord("ex4.2", answer)',
    "ex4.3": 'answer = results[1].errname\nrecord("ex4.3", answer)',
    "ex5.1": ('answer = {"rdma": "long-term", "v4l2": "long-term", "odirect": "transient", '
              '"io_uring": "long-term"}\nrecord("ex5.1", answer)'),
    "ex5.2": ('odirect = next(r for r in results if (r.mechanism, r.memory) == ("odirect", "fsdax-xfs"))\n'
              'answer = bool(odirect.foll_pin_delta)\nrecord("ex5.2", answer)'),
    "ex6.1": 'answer = tw.where[0]\nrecord("ex6.1", answer)',
    "ex6.2": ('answer = ["get_user_pages_longterm", "FOLL_LONGTERM", "FOLL_PIN", "check_vma_flags"]\n'
              'record("ex6.2", answer)'),
    # code: the learner's probe, judged by the kernel
    "ex3.4": 'answer = "r:mine check_vma_flags ret=$retval:s32"\nrecord("ex3.4", answer)',
    # predictions: completion only
    **{ex: f'answer = "my prediction, written before the measurement"\nrecord("{ex}", answer)'
       for ex in ("ex2.0", "ex3.0", "ex4.0", "ex5.0", "ex6.0", "ex9.0")},
    # explanations: recorded for the instructor (rubric in instructor/rubrics.md)
    **{ex: f'answer = "A model answer is in the instructor rubric; this text is long enough."\nrecord("{ex}", answer)'
       for ex in ("ex1.3", "ex3.5", "ex5.3", "ex6.3", "ex6.4", "ex9.3")},
    "ex7.1": ('lab.mount("xfs", "/dev/" + roles["fsdax-xfs"].blockdev, "/mnt/capstone", options="dax")\n'
              'answer = "/mnt/capstone"\nrecord("ex7.1", answer)'),
    "ex7.2": ('tried = lab.pin_many([("rdma", k, "shared") for k in ("fsdax-xfs", "fsdax-ext4", "devdax")])\n'
              'answer = next(r.memory for r in tried if r.ok)\nrecord("ex7.2", answer)'),
    "ex7.3": 'answer = lab.pin("io_uring", "fsdax-ext4").errname\nrecord("ex7.3", answer)',
    "ex7.4": ('held = lab.hold_pin("rdma", "anon", size=4 * 2**20)\nanswer = lab.vmpin_kb(held.pid)\n'
              'held.release()\nrecord("ex7.4", answer)'),
    "ex7.5": 'answer = lab.truncate_wait("ext4").where[0]\nrecord("ex7.5", answer)',
    "ex7.6": 'answer = lab.pin("odirect", "fsdax-ext4").ok\nrecord("ex7.6", answer)',
    "ex8.1": 'answer = "check_vma_flags"\nrecord("ex8.1", answer)',
    "ex9.1": 'answer = here.pin("rdma-odp", "anon").errname or "ok"\nrecord("ex9.1", answer)',
    "ex9.2": 'answer = here.pin("rdma-odp", "anon").device_odp\nrecord("ex9.2", answer)',
}


def fill(nb) -> list[str]:
    """Put the reference solutions into the exercise cells of ``nb`` (in place);
    returns the ids filled."""
    done = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and "exercise" in tags:
            for t in tags:
                if t in SOLUTIONS:
                    cell.source = SOLUTIONS[t]
                    done.append(t)
    return done
