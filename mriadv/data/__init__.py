"""fastMRI single-coil data: files and index (:mod:`.files`), masks (:mod:`.masks`), transforms
(:mod:`.transforms`), the synthetic generator (:mod:`.synthetic`, drawing its knee-like phantom with
:mod:`.phantom`), a folder check (:mod:`.check`), and a run's datasets and loaders (:mod:`.loading`)."""
