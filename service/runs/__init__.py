"""Runs over a whole file: `sluice label` (dataset rows -> labels) and `sluice batch` (an OpenAI Batch file).

Both post one job per row, collect the results and append one line per row to an output file
that is also the run's record of what is done, so a run killed at any point resumes where it
stopped and never writes a row twice.
"""
