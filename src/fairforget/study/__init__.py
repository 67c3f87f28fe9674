"""The study level: the stage list of each preset (:mod:`.plan`, :mod:`.stage`), running it with skip-if-done
records (:mod:`.pipeline`), the methods comparison's tables (:mod:`.compare`) and the report (:mod:`.report`)."""
