"""The driver side of a run: prepare a job, open or resume its store, stream units to workers
(``stream``), label regions (``regions``), ingest DICOM series (``ingest``), finish and report
(``run``, ``report``, ``preview``); batches over archives (``batch``) and Ray job submission
(``submit``)."""
