"""The service's clients: `sluice submit`, `sluice label` and `sluice batch`.

`sluice submit` posts job lines and prints their result lines. `sluice label` (dataset rows ->
labels) and `sluice batch` (an OpenAI Batch file) are runs over a whole file: both post one job
per row, collect the results and append one line per row to an output file that is also the
run's record of what is done, so a run killed at any point resumes where it stopped and never
writes a row twice. All of them reach the service through one Kafka backend (backends.py).
"""
