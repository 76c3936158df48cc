"""Converters from the published formats of real fMRI datasets into the project's shards.

`python -m data.convert DATASET --root DOWNLOADED --subject N --out FOLDER`; each module
here reads one dataset's official files into a `output.SubjectSource`, and `output`
writes it (resumable, checksummed, parallel).
"""
