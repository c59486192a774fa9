"""Inspector: a local web app and a static report over one hardneg output folder.

Modules, one concern each: `store` reads the Parquet output lazily, `stats` streams the statistics, `plots` draws
them as inline SVG, `images` serves thumbnails from inside the image root only, `pages` renders escaped HTML, `app`
is the HTTP server, `report` the static HTML file, `cli` the subcommands. Marks go through `pipeline.blocklist`.
"""
