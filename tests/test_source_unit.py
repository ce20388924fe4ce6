"""The kernel-source viewer's text work (finding functions, marking lines) on
small C fixtures written in kernel style, and the source package's name and
version from an image manifest. The real sources are read in test_lab.py."""

from __future__ import annotations

import pytest

from labkit.course import source
from labkit.errors import HostSetupError
from labkit.image import kernelsrc

C = """\
/* SPDX-License-Identifier: GPL-2.0 */
#include <linux/mm.h>

static int check_vma_flags(struct vm_area_struct *vma, unsigned long gup_flags);

static int check_vma_flags(struct vm_area_struct *vma, unsigned long gup_flags)
{
	const char *s = "}{ not a brace";	/* nor these: { { */
	if ((gup_flags & FOLL_LONGTERM) && vma_is_fsdax(vma))
		return -EOPNOTSUPP;
	/*
	 * a comment with a brace }
	 */
	if ((gup_flags & FOLL_SPLIT_PMD) && is_vm_hugetlb_page(vma))
		return -ENOTSUP;
	if (vm_flags & (VM_IO | VM_PFNMAP)) {
		return -EFAULT;
	}
	return 0;
}

static struct page *
follow_page_mask(struct vm_area_struct *vma,
		 unsigned long address)
{
	return NULL;
}

struct ops {
	int (*check_vma_flags)(int);
};
"""
LINES = C.splitlines()


def test_definition_found_not_prototype_and_braces_in_strings_and_comments_ignored():
    first, last = source.function_span(LINES, "check_vma_flags")
    assert LINES[first].startswith("static int check_vma_flags(") and LINES[first].endswith(")")
    assert LINES[last] == "}" and LINES[last - 1] == "\treturn 0;"


def test_return_type_on_the_line_above_is_part_of_the_listing():
    first, last = source.function_span(LINES, "follow_page_mask")
    assert LINES[first] == "static struct page *" and LINES[last] == "}"


def test_a_name_that_only_appears_in_a_struct_or_call_is_not_a_definition():
    assert source.function_span(LINES, "vma_is_fsdax") is None
    assert source.function_span(["struct ops {", "\tint (*f)(int);", "};"], "f") is None


def test_returning_marks_every_line_that_returns_the_probed_errno_by_any_of_its_names():
    src_lines = LINES
    first, last = source.function_span(src_lines, "check_vma_flags")
    listing = source.Listing("mm/gup.c", "check_vma_flags", first + 1, tuple(src_lines[first:last + 1]))
    marked = listing.returning(-95)          # EOPNOTSUPP and ENOTSUP are both 95 on Linux
    assert [src_lines[n - 1].strip() for n in marked] == ["return -EOPNOTSUPP;", "return -ENOTSUP;"]
    assert [src_lines[n - 1].strip() for n in listing.returning(-14)] == ["return -EFAULT;"]
    assert listing.returning(0) == [last]    # "return 0;"
    assert listing.returning(-4095) == []    # no errno has that value
    fsdax = listing.matching(r"FOLL_LONGTERM\) && vma_is_fsdax")
    assert fsdax and fsdax[0] + 1 == marked[0]


def test_text_and_html_show_numbers_marks_and_escape_the_source():
    listing = source.Listing("x.c", "f", 10, ("int f(void)", "{", "\treturn a < b && c > d;", "}"), "6.1.0-57-amd64")
    text = listing.text(mark=[12])
    assert "> 12  \treturn a < b" in text and "  10  int f(void)" in text
    page = listing.html(mark=[12], note="caught by the kretprobe")
    assert "a &lt; b &amp;&amp; c &gt; d" in page and "<b" not in page.replace("<br", "")
    assert "x.c:10-13 (Linux 6.1.0-57-amd64) - caught by the kretprobe" in page
    assert page.count("background:#fff3b0") == 1


def test_kernel_source_function_grep_and_clear_errors(tmp_path):
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "gup.c").write_text(C)
    src = source.KernelSource(tmp_path, "6.1.0-57-amd64")
    listing = src.function("check_vma_flags")
    assert listing.path == "mm/gup.c" and listing.start == 6
    hits = src.grep(r"FOLL_LONGTERM")
    assert [(p, n, fn) for p, n, fn, _ in hits] == [("mm/gup.c", 9, "check_vma_flags")]
    with pytest.raises(source.SourceNotFound) as e:
        src.function("dax_break_layout")
    assert "6.1.0-57-amd64" in str(e.value) and "grep" in e.value.hint
    for bad in ("", "a b", "x; rm -rf /", None):
        with pytest.raises(source.SourceNotFound):
            src.function(bad)          # type: ignore[arg-type]
    with pytest.raises(source.SourceNotFound) as e:
        src.lines("fs/nope.c")
    assert "mm/gup.c" in e.value.hint


@pytest.mark.parametrize("version, package", [
    ("6.1.192-3", "linux-source-6.1"),
    ("6.12.117-1~deb12u1", "linux-source-6.12"),
    ("7.3.4-1~bpo13+1", "linux-source-7.3"),
])
def test_source_package_is_the_exact_version_the_image_was_built_from(version, package):
    manifest = {"kernel_package": {"name": "linux-image-x", "version": version}, "kernel_release": "x"}
    assert kernelsrc.source_package("k", manifest) == (package, version)


def test_an_image_without_a_recorded_version_says_to_rebuild():
    with pytest.raises(HostSetupError) as e:
        kernelsrc.source_package("6.1", {"kernel_release": "6.1.0-57-amd64"})
    assert "labkit image build --kernel 6.1 --force" in e.value.hint


def test_private_apt_uses_the_mirror_given_and_never_the_hosts_state(tmp_path, monkeypatch):
    from labkit.settings import Settings
    opts = kernelsrc._apt_root("7.3", tmp_path, Settings.from_env({"LABKIT_MIRROR": "http://mirror.invalid/debian"}))
    listed = (tmp_path / "sources.list.d" / "mirror.list").read_text().splitlines()
    assert "deb http://mirror.invalid/debian trixie-backports main" in listed
    joined = " ".join(opts)
    assert "Dir::Etc::SourceList=/dev/null" in joined and f"Dir::State::Lists={tmp_path / 'lists'}" in joined
    assert "/var/lib/apt" not in joined and "/etc/apt" not in joined


def test_a_cached_fetch_of_fewer_files_is_not_complete(tmp_path):
    import json
    (tmp_path / kernelsrc.MANIFEST).write_text(json.dumps({"requested": ["mm/gup.c"]}))
    assert not kernelsrc._complete(tmp_path)
    (tmp_path / kernelsrc.MANIFEST).write_text(json.dumps({"requested": list(kernelsrc.FILES)}))
    assert kernelsrc._complete(tmp_path)
    assert not kernelsrc._complete(tmp_path / "missing")


def test_an_errno_set_and_returned_through_a_label_is_marked_too():
    """5.10's __gup_longterm_locked() sets ``rc = -EOPNOTSUPP;`` and jumps to ``out:``, which returns rc."""
    lines = ["static long __gup_longterm_locked(struct mm_struct *mm, unsigned int gup_flags)", "{",
             "\tlong rc = 0;", "\tif (check_dax_vmas(vmas_tmp, rc)) {", "\t\trc = -EOPNOTSUPP;", "\t\tgoto out;",
             "\t}", "out:", "\treturn rc;", "}"]
    listing = source.Listing("mm/gup.c", "__gup_longterm_locked", 1, tuple(lines))
    assert listing.returning(-95) == [5]
    assert listing.returning(-14) == []
