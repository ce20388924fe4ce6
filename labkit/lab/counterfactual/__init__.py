"""What if the check were not there: switch the v4.15 rule off in the live
guest and measure what it prevents.

Two small kernel modules, built into the guest image by
``images/build-modules.sh`` from ``labkit/lab/guest/modules/``:

* ``no-longterm-check`` (``labkit_no_longterm_check``): a kretprobe on
  ``check_vma_flags()`` turns its ``-EOPNOTSUPP`` for a ``FOLL_LONGTERM`` pin of
  an fs-dax VMA into 0, so ``ibv_reg_mr`` on a DAX file succeeds;
* ``no-layout-wait`` (``labkit_no_layout_wait``): ``dax_layout_busy_page{,_range}()``
  answer NULL, so truncate frees DAX blocks without waiting for busy pages.

``with counterfactual(lab, "no-longterm-check"):`` loads them (the kernel is
tainted, and the guest is marked modified in ``/run/labkit/modified`` until a
reset) and unloads them on exit. The experiments run
``guest/counterfactual.py`` in the guest and return what the live kernel did:
errno, waits, block numbers, checksums, kernel log lines (WARNs included). A
verdict says in words whether the kernel did what the story predicts, and if
not, which evidence says otherwise. ``fence_trace`` counts what each GUP
function returns during one registration: on 7.3 it shows the second fence
(``folio_is_longterm_pinnable()``, e5cb23256347) that module 1 does not touch.
"""

from labkit.lab.counterfactual.experiments import *  # noqa: F403
from labkit.lab.counterfactual.experiments import __all__ as _experiments
from labkit.lab.counterfactual.fences import *  # noqa: F403
from labkit.lab.counterfactual.fences import __all__ as _fences
from labkit.lab.counterfactual.switch import *  # noqa: F403
from labkit.lab.counterfactual.switch import __all__ as _switch

__all__ = _switch + _experiments + _fences
