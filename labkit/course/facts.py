"""The course's fact table: every kernel-history claim the notebooks make,
with the commit that made it true (12 hex digits), the first release that
contains it, and the notebooks that use it.

How each entry was checked (2026-12, with the stored public-text search over
kernel mailing-list archives, mirrored commit pages and kernel sources; never
from memory):

* ``commit_evidence`` says where the commit id and its subject were seen
  together (a ``Fixes:`` tag, a maintainer's list of merged commits, a
  mirrored commit page).
* ``release_evidence`` says why the release is the first one containing it.
  Where no source could be found, ``release`` is ``None``: the notebooks may
  cite the commit but must not state a version for it (tests/test_facts.py
  enforces that every version in the notebooks' prose is a verified release
  in this table).

Measured behaviour (errnos, pin counts, warnings) is *not* in this table: the
lab measures it live on the guest, and the notebooks compare with
``uname -r`` instead of stating versions for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    key: str
    claim: str
    commit: str | None          # 12 hex digits, or None for a fact that is not one commit
    subject: str                # the commit's subject line (or the source's title)
    release: str | None         # first release containing it ("4.15"), None if not verified
    notebooks: tuple[str, ...]
    commit_evidence: str
    release_evidence: str = ""


COVER_LETTER = ("[PATCH v2 0/4] introduce get_user_pages_longterm() (Dan Williams, 2017-11-14, "
                "lkml.org/lkml/2017/11/14/569); v3 'Rebased on v4.15-rc1', summary unchanged")

FACTS: tuple[Fact, ...] = (
    Fact("gup-longterm",
         "get_user_pages_longterm(): a separate GUP entry point for callers that keep pages indefinitely; "
         "it refuses VMAs for which vma_is_fsdax() is true (-EOPNOTSUPP). Each caller opted in by calling it.",
         "2bb6d2837083", "mm: introduce get_user_pages_longterm", "4.15", ("03", "04", "06", "07", "09"),
         "Fixes: 2bb6d2837083 (\"mm: introduce get_user_pages_longterm\") in Dan Williams' S_ISCHR fix "
         "(linux-mm, 2018-02); the commit page on a raspberrypi/linux mirror quotes the series text",
         "the v3 series was rebased on v4.15-rc1 and tagged for -stable (cover letter), i.e. merged as a "
         "fix during the v4.15-rc cycle"),
    Fact("cover-letter",
         "The v4.15 cover letter: long-term references are untenable for fs-dax; waiting for idle DAX pages "
         "before truncate/hole-punch reuses blocks is 'saved for a later patch series'; long-term DAX "
         "registration would need a future 'map with lease'; tagged for -stable to 'purposely break' "
         "long-term registrations of fs-dax, one reason the EXPERIMENTAL mount warning is kept; "
         "device-dax does not suffer the same constraints (no file space management such as hole-punch).",
         None, "introduce get_user_pages_longterm() (cover letter)", "4.15", ("03", "05", "06", "09"),
         COVER_LETTER, "same series as 2bb6d2837083"),
    Fact("get-vaddr-frames-fsdax",
         "get_vaddr_frames() (the frame_vector helper videobuf2 uses for USERPTR) got its own "
         "vma_is_fsdax() refusal in the same v4.15 series.",
         "b7f0554a56f2", "mm: fail get_vaddr_frames() for filesystem-dax mappings", "4.15", ("04", "08"),
         "Fixes: b7f0554a56f2 (\"mm: fail get_vaddr_frames() for filesystem-dax mappings\") in Christophe "
         "JAILLET's semaphore fix (2017-12, acked by Michal Hocko) and in Daniel Vetter's FOLL_LONGTERM "
         "thread; patch 2/4 of the v2/v3 series (cover letter: 'Add a new patch for the get_vaddr_frames() case, this "
         "impacts users like V4L2'); v3 adds a comment for that check at Jan Kara's request",
         "same series as 2bb6d2837083"),
    Fact("videobuf-dma-sg-fsdax",
         "The older videobuf (videobuf-dma-sg) switched to get_user_pages_longterm() in the v4.15 series.",
         None, "[media] v4l2: disable filesystem-dax mapping support", "4.15", ("04",),
         "listed in the v1 cover letter (lkml.iu.edu 1711.0/04916) with drivers/media/v4l2-core/videobuf-dma-sg.c",
         "same series as 2bb6d2837083"),
    Fact("ib-umem-fsdax",
         "RDMA's ib_umem_get() switched to get_user_pages_longterm() in the v4.15 series.",
         "5f1d43de5416", "IB/core: disable memory registration of filesystem-dax vmas", "4.15", ("03",),
         "listed in the v1 cover letter with drivers/infiniband/core/umem.c; mirrored commit page (git.zx2c4.com "
         "linux-dev) of 5f1d43de54164dcfb9bfa542fcc92c1e1a1b6c1d, author Dan Williams, parent 'v4l2: disable "
         "filesystem-dax mapping support'",
         "same series as 2bb6d2837083, committed to mainline by Linus Torvalds on the same day (2017-11-29, "
         "mirrored commit pages of both)"),
    Fact("foll-longterm",
         "get_user_pages_longterm() becomes a flag, FOLL_LONGTERM, accepted by the ordinary GUP calls; the "
         "separate function is removed.",
         "932f4a630a69", "mm/gup: replace get_user_pages_longterm() with FOLL_LONGTERM", "5.2", ("03", "06"),
         "Fixes: 932f4a630a69 (\"mm/gup: replace get_user_pages_longterm() with FOLL_LONGTERM\") in Vlastimil "
         "Babka's reply to a 2019 mm/gup.c fix; mirrored commit page (git.zx2c4.com linux-dev) of "
         "932f4a630a695212bdc7379b05f9bd0dafc5d968 with this subject, author Ira Weiny",
         "committed to mainline by Linus Torvalds on 2019-05-14 (mirrored commit page); v5.1 was tagged "
         "2019-05-05 and v5.2-rc1 2019-05-19 (mirrored tag pages); on 2019-04-25 it was still an -mm patch "
         "queued against 5.1-rc6 (akpm's 'mmotm 2019-04-25-16-30 uploaded'), so it is not in v5.1"),
    Fact("foll-pin",
         "pin_user_pages*() and FOLL_PIN: pins are counted apart from ordinary references "
         "(nr_foll_pin_* in /proc/vmstat).",
         "eddb1c228f79", "mm/gup: introduce pin_user_pages*() and FOLL_PIN", "5.6", ("04", "05", "06"),
         "Fixes: eddb1c228f79 (\"mm/gup: introduce pin_user_pages*() and FOLL_PIN\") (Vitaly Kuznetsov, 2020-05)",
         "NVIDIA's open driver conftest: 'pin_user_pages() was added by commit eddb1c228f79 ... in v5.6'"),
    Fact("videobuf-pin",
         "videobuf-dma-sg (the old videobuf) converted to pin_user_pages() in the FOLL_PIN series.",
         "1f815afcfca7", "media/v4l2-core: pin_user_pages (FOLL_PIN) and put_user_page() conversion", None,
         ("04",),
         "listed with eddb1c228f79 in a list of the merged FOLL_PIN series commits", ""),
    Fact("frame-vector-longterm",
         "get_vaddr_frames() itself takes FOLL_LONGTERM (Daniel Vetter's series, which also moved "
         "frame_vector into the media subsystem); until then videobuf2's refusal was get_vaddr_frames()' "
         "own vma_is_fsdax() test.",
         "04769cb1c45a", "mm/frame-vector: Use FOLL_LONGTERM", "5.12", ("04", "10"),
         "patch 05 of 'follow_pfn and other iomap races' v2-v5 (Oct-Nov 2020), next to 'media: videobuf2: Move "
         "frame_vector into media subsystem'; a linux-next revlist lists 04769cb1c45a919cd94b931e6494d2a9afc32914 "
         "with this subject, followed by eb83b8e3e647 (the move)",
         "that revlist sits among branches queued for v5.12 (after \"Merge tag 'v5.11-rc2'\" and "
         "'renesas-pinctrl-for-v5.12-tag1'), so it is not in v5.11; the lab's 5.10 source still has the "
         "vma_is_fsdax() test in mm/frame_vector.c"),
    Fact("check-vma-flags-fsdax",
         "The fs-dax test moves into check_vma_flags(), the per-VMA check every GUP walk already ran: "
         "FOLL_LONGTERM && vma_is_fsdax(vma) -> -EOPNOTSUPP (check_vma_flags() itself is older; it existed "
         "for the VM_READ/VM_WRITE permission checks).",
         "52650c8b466b", "mm/gup: remove the vma allocation from gup_longterm_locked()", "5.11",
         ("03", "06", "07"),
         "mm tree revlists (akpm) list 52650c8b466bac39 with this subject; NVIDIA's driver names it as the "
         "commit that ended the vmas array allocation for FOLL_LONGTERM; mirrored commit page (git.zx2c4.com "
         "linux-dev) of 52650c8b466bac399aec213c61d74bfe6f7af1a4, author Jason Gunthorpe",
         "committed to mainline by Linus Torvalds on 2020-12-15 (mirrored commit page): after v5.10 (tagged "
         "2020-12-13) and before v5.11-rc1 (2020-12-27), i.e. in the v5.11 merge window (mirrored tag pages)"),
    Fact("gup-longterm-locked-5.10",
         "Before v5.11 the GUP path refused after the pin: __gup_longterm_locked() pinned the pages, walked "
         "their VMAs with check_dax_vmas() (inlined: no symbol of its own) and, on an fs-dax VMA, unpinned "
         "them again and set rc = -EOPNOTSUPP; check_vma_flags() had no fs-dax test. A kretprobe on "
         "__gup_longterm_locked sees the refusal; check_vma_flags has no symbol to probe on 5.10.",
         "932f4a630a69", "mm/gup: replace get_user_pages_longterm() with FOLL_LONGTERM", "5.2", ("10",),
         "read in the lab's 5.10 source (Debian linux-source-5.10 5.10.262-1, mm/gup.c: __gup_longterm_locked "
         "at lines 1707-1758, check_dax_vmas at 1577-1594; `labkit source __gup_longterm_locked --kernel 5.10`); "
         "the 5.10 guest's /proc/kallsyms has __gup_longterm_locked and get_vaddr_frames, not check_vma_flags "
         "or check_dax_vmas; __gup_longterm_locked() came with FOLL_LONGTERM (see foll-longterm)",
         "same commit as foll-longterm (v5.2); still there in 5.10 and moved by 52650c8b466b (v5.11)"),
    Fact("dax-layout-busy-page",
         "dax_layout_busy_page(): find a DAX page that is still referenced before a filesystem frees its blocks.",
         "5fac7408d828", "mm, fs, dax: handle layout changes to pinned dax mappings", "4.18", ("08",),
         "commit page 5fac7408d828719db6d3fdba63e3c3726a6d1ee5 (Dan Williams, 2018-03-09) on a mirror; listed "
         "with d6dc57e251a4 among the merged break-layouts commits",
         "the 'libnvdimm-for-4.18' tag message (nvdimm tree, mirrored) says it introduces "
         "dax_layout_busy_page(); the 'libnvdimm-for-4.17' merge says the truncate work was rewound and "
         "'will need to wait for 4.18'; d6dc57e251a4 (v4.18) calls dax_layout_busy_page()"),
    Fact("xfs-break-dax-layouts",
         "XFS waits for DAX pages to go idle before truncate/hole-punch frees blocks: xfs_break_dax_layouts().",
         "d6dc57e251a4", "xfs, dax: introduce xfs_break_dax_layouts()", "4.18", ("06", "07", "08"),
         "Dan Williams lists 'd6dc57e251a4 xfs, dax: introduce xfs_break_dax_layouts()' among the merged "
         "break-layouts commits (with 5fac7408d828 'mm, fs, dax: handle layout changes to pinned dax "
         "mappings'); series v9-v11 posted April-May 2018; mirrored commit page (git.zx2c4.com linux-dev) of "
         "d6dc57e251a43c428a9ee3adb7665543a1a584f0, committed by Dan Williams 2018-05-22",
         "the nvdimm tree's 'for-4.18/dax' branch (fs/xfs changes) went into libnvdimm-for-next, which Linus "
         "merged as \"Merge tag 'libnvdimm-for-4.18'\" on 2018-06-08 (mirrored log of include/linux/dax.h, "
         "where 5fac7408d828 of the same series sits under that merge)"),
    Fact("ext4-break-layouts",
         "ext4 does the same wait: ext4_break_layouts().",
         "430657b6be89", "ext4: handle layout changes to pinned DAX mappings", "4.19", ("06", "07", "08"),
         "same list of merged commits; xfstests generic/503 is its regression test; mirrored commit page "
         "(git.zx2c4.com linux-dev) of 430657b6be896db57d974375cc499ca212c7f01d, author Ross Zwisler",
         "committed to the ext4 tree by Ted Ts'o on 2018-07-29, after the v4.18 merge window; a fix for it "
         "('ext4: close race between direct IO and ext4_break_layouts()') reached mainline during the v4.19 "
         "release candidates (\"Merge tag 'ext4_for_linus_stable'\", 2018-09-17, after 4.19-rc4), so the "
         "function was already in the v4.19 merge"),
    Fact("longterm-file-write",
         "Writable FOLL_LONGTERM pins of file-backed shared mappings that need dirty tracking (page cache) "
         "are refused (the GUP-fast half is a6e79df92e4a).",
         "8ac268436e6d", "mm/gup: disallow FOLL_LONGTERM GUP-nonfast writing to file-backed mappings", "6.5",
         ("03", "08"),
         "cited by id and subject in KVM SEV and guest_memfd threads; the akpm/mm mm-stable revlist of "
         "2023-06-10 has 8ac268436e6d52f3",
         "in mm-stable on 2023-06-10 (kernel.org post-receive mail) and 'from May 2023' (its author): "
         "mm-stable at that date is the queue for the v6.5 merge window"),
    Fact("iouring-gup-file-check",
         "io_uring stops checking for file-backed VMAs itself and leaves the decision to GUP.",
         "34ed8d0dcd69", "io_uring: rsrc: delegate VMA file-backed check to GUP", None, ("05",),
         "in the same akpm/mm mm-stable revlist (2023-06-10) as 8ac268436e6d", ""),
    Fact("rxe-odp",
         "soft-RoCE (rxe) accepts On-Demand-Paging registrations.",
         "d03fb5c6599e", "RDMA/rxe: Allow registering MRs for On-Demand Paging", "6.15", ("03", "06", "09"),
         "mirrored commit page (infradead nvme.git), patch of 2024-12-20 by Daisuke Matsuda; the rdma.git "
         "post-receive mail of 2025-02-23 (wip/leon-for-next) lists d03fb5c6599e31b9 with this subject",
         "in rdma.git for-next (2025-02-23) and linux-next next-20250225: queued during the v6.14 release "
         "candidates for the next merge window; rdma-core PR #1605 (May 2025) calls rxe's ODP 'already merged'; "
         "the lab's 6.12 guest has no ODP in rxe, its 7.3 guest has"),
    Fact("rxe-odp-invalidate",
         "rxe's ODP MRs register an MMU interval notifier whose callback, rxe_ib_invalidate_range(), "
         "unmaps the device's view of a range when the kernel invalidates it.",
         "b601792392f9", "RDMA/rxe: Add page invalidation support", "6.15", ("09",),
         "the same rdma.git post-receive mail (2025-02-23) and linux-next revlist (2025-02-25) as d03fb5c6599e",
         "same series and the same pushes as d03fb5c6599e"),
    Fact("fsdax-refcount",
         "fs-dax pages become ordinarily reference-counted (a DAX page is free when its refcount drops to "
         "zero, like any other page).",
         "38607c62b34b", "fs/dax: properly refcount fs dax pages", "6.15", ("09",),
         "Fixes: 38607c62b34b (\"fs/dax: properly refcount fs dax pages\") in David Hildenbrand's fsdax "
         "folio fix (April 2025) and in Souvik Banerjee's fs/dax fixes; akpm/mm mm-stable push of 2025-03-18 "
         "lists 38607c62b34b46317c46d5baf1df03ac6e48a1c6",
         "Souvik Banerjee's fixes for it carry 'Cc: stable@vger.kernel.org # v6.15+'"),
    Fact("gup-fsdax-not-longterm-pinnable",
         "folio_is_longterm_pinnable() answers false for fs-dax folios, so a FOLL_LONGTERM pin of fs-dax "
         "memory that gets past check_vma_flags() is handed to the migration step after pinning (a second "
         "fence behind the VMA test).",
         "e5cb23256347", "mm/gup: don't allow FOLL_LONGTERM pinning of FS DAX pages", "6.15", ("08",),
         "akpm/mm post-receive mail of 2025-03-18 (mm-everything revlist) lists "
         "e5cb23256347469c80138a2a8804887239465d0b with this subject, next to 38607c62b34b in the fs-dax "
         "refcount series; the printk tree's for-linus revlist of 2025-08-04 lists it among mainline commits",
         "same series and the same mm-stable push (2025-03-18) as 38607c62b34b, whose fixes are tagged "
         "stable v6.15+; the lab's 7.3 guest shows the test in include/linux/mm.h"),
    Fact("dax-break-layout",
         "A common dax_break_layout() replaces the per-filesystem wait loops (ext4_break_layouts' and "
         "xfs_break_dax_layouts' own waits).",
         "d5b3afea22a5", "fs/dax: create a common implementation to break DAX layouts", "6.15", ("06", "09"),
         "akpm/mm mm-stable push of 2025-03-18 lists d5b3afea22a52517e6bc835432e6dfd079b8bf7c with this "
         "subject, in the same series as 38607c62b34b",
         "same series and the same mm-stable push as 38607c62b34b (fixes tagged stable v6.15+)"),
    Fact("lab-kernel-6.1", "The lab's default guest kernel image.", None, "labkit.image.KERNELS", "6.1",
         ("00", "06", "07"), "the lab builds and boots it; notebooks print the live uname -r",
         "Debian bookworm's linux-image-amd64"),
    Fact("lab-kernel-6.12", "The lab's second guest kernel image.", None, "labkit.image.KERNELS", "6.12",
         ("00", "06", "07"), "the lab builds and boots it; notebooks print the live uname -r",
         "Debian bookworm-security's linux-image-6.12-amd64"),
    Fact("lab-kernel-7.3", "The lab's third guest kernel image.", None, "labkit.image.KERNELS", "7.3",
         ("09",), "the lab builds and boots it; notebooks print the live uname -r",
         "Debian trixie-backports' linux-image-7.3.4+deb13-amd64"),
    Fact("lab-kernel-5.10", "The lab's fourth guest kernel image: the kernel before v5.11's move of the "
         "fs-dax test (Debian 11's own kernel, bullseye userland).", None, "labkit.image.KERNELS", "5.10",
         ("10",), "the lab builds and boots it; notebooks print the live uname -r",
         "Debian bullseye's linux-image-amd64 (linux-image-5.10.0-46-amd64 5.10.262-1)"),
)

BY_KEY = {f.key: f for f in FACTS}


def verified_releases() -> set[str]:
    """Releases the notebooks may state (each backed by an entry with evidence)."""
    return {f.release for f in FACTS if f.release}


def commits() -> set[str]:
    return {f.commit for f in FACTS if f.commit}


def cite(key: str) -> str:
    """A short citation for prose: ``subject (commit, vX.Y)``."""
    f = BY_KEY[key]
    parts = [p for p in (f.commit, f"v{f.release}" if f.release else None) if p]
    return f"\"{f.subject}\"" + (f" ({', '.join(parts)})" if parts else "")
