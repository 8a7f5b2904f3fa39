"""Dataset converters: find a download's scenes, then read each as (image, class mask).

Each converter module (isaid, loveda, openearthmap, folder) exposes
`find_scenes(source_dir, data_config) -> Inventory`: it only lists files, so a split can be
assigned and a partial download reported before any pixel is read. `scenes.load_scene`
then reads one scene with the checks every dataset needs (sizes match, classes in range,
no oversized images). `demo` draws procedural scenes in the folder layout.
"""

# data.format -> the converter module of that name (the demo writes a `folder` download first).
FORMATS = ("isaid", "loveda", "openearthmap", "folder", "demo")
