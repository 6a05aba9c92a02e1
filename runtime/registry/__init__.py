"""The version registry: versions of a bundle store, lazy loads, hot swaps, idle unload, memory budget.

A request *leases* the ready predictor of a version and holds it until done, so a swap or an unload
never cuts a request short; a replacement that fails to load never displaces a working version; a
version becomes routable only after verification, graph checks, a warm-up run and its golden
self-test. One module per job, each stating its invariant:

======================  ================================================================================
module                  one job
======================  ================================================================================
:mod:`.options`         :class:`RegistryOptions`, the one settings object (every default defined once)
:mod:`.lifecycle`       slots and their transitions: load (single flight), swap, retire, drain, remove
:mod:`.names`           name → version: aliases (+ the server's :class:`RouteOverlay`), ``latest``, API
                        compatibility, the pinned set
:mod:`.policy`          which loaded versions to let go: memory budget, idle reaper
:mod:`.scan`            the store on disk → slots (verify before listing, load replacements aside), and
                        ``aliases.json`` as each scan read it (:class:`~.scan.ScannedStore`)
:mod:`.recovery`        where last-known-good is kept (a writable state directory) or why it is off
:mod:`.status`          :class:`RegistrySnapshot` / :class:`VersionStatus`: typed, frozen status
:mod:`.core`            :class:`Registry`: the parts wired together, start/close, leases and inference
======================  ================================================================================
"""

from .core import Registry
from .lifecycle import State
from .names import RouteOverlay
from .options import RegistryOptions
from .status import RegistrySnapshot, VersionStatus

__all__ = ["Registry", "RegistryOptions", "RegistrySnapshot", "RouteOverlay", "State", "VersionStatus"]
