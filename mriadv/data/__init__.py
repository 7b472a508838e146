"""fastMRI single-coil data: files and index (:mod:`.files`), masks (:mod:`.masks`), transforms
(:mod:`.transforms`), the synthetic generator (:mod:`.synthetic`) and a folder check (:mod:`.check`)."""
