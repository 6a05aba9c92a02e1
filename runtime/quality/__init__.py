"""Quality measured on labeled data: the metrics (:mod:`.metrics`), labeled datasets in the CIHP/LIP layout
(:mod:`.dataset`), the grades kept in the state directory (:mod:`.grades`) and ``m2fp-eval`` (:mod:`.cli`).

Like the rest of the runtime it never imports torch, the server or the export package.
"""
