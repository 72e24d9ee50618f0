//! Pictures and streams: `map --visual` against what `map --output json` says, `layout` against
//! the bytes of the image file, and `map --output json` as JSON Lines.

use std::path::{Path, PathBuf};

use serde_json::Value;
use vd_tests::corpus::{decompress, expected, image_name};
use vd_tests::process::{stderr, stdout};
use vd_tests::s;
use vd_tests::tool::map_lines;
use vd_tests::vhdx::{
    H_SEQUENCE, HEADERS, META_FILE_PARAMETERS, META_LOGICAL_SECTOR_SIZE, META_VIRTUAL_DISK_SIZE,
    REGION_BAT, REGION_METADATA, bat_entry, log_region, meta_item, region, u32_at, u64_at,
    usize_of,
};

vd_tests::vd_tool_fns!();

/// A dynamic image with data and holes (100 MiB, 32 MiB blocks: FULLY_PRESENT, NOT_PRESENT
/// and ZERO blocks).
const DYNAMIC: &str = "coreos-hyperv/config2_base.vhdx.bz2";
/// A fixed image (10 MiB).
const FIXED: &str = "dissect.hypervisor/fixed.vhdx.gz";
/// A differencing image (partially present blocks) whose parent is in the corpus.
const CHILD: &str = "dissect.hypervisor/differencing.avhdx.gz";

/// Decompresses corpus image `name` into `dir` (a differencing image with the parent
/// expected.json names, under the name its locator gives) and returns the image's path.
fn corpus(dir: &Path, name: &str) -> PathBuf {
    let image = dir.join(image_name(name));
    decompress(name, &image);
    if let Some(parent) = expected()
        .iter()
        .filter(|c| c["file"] == name)
        .find_map(|c| c.get("parent").filter(|p| !p.is_null()).cloned())
    {
        let place = dir.join(parent["place_as"].as_str().expect("place_as"));
        decompress(parent["file"].as_str().expect("parent file"), &place);
    }
    image
}

/// The extents of `map --output json`, after checking they cover the disk in order.
fn map_json(img: &Path) -> (Value, Vec<Value>) {
    let o = vd_ok(&["map", "--output", "json", s(img)]);
    let (header, extents) = map_lines(&o.stdout);
    let size = header["virtual_size"].as_u64().expect("virtual_size");
    let mut pos = 0;
    for e in &extents {
        assert_eq!(
            e["start"].as_u64(),
            Some(pos),
            "extents are contiguous: {e}"
        );
        let len = e["length"].as_u64().expect("length");
        assert!(len > 0, "{e}");
        assert!(e["state"] == "data" || e["state"] == "zero", "{e}");
        if let Some(layer) = e["layer"].as_u64() {
            assert_eq!(
                e["file"], header["layers"][layer as usize]["file"],
                "an extent's file is its layer's: {e}"
            );
        } else {
            assert!(e.get("file").is_none(), "{e}");
        }
        pos += len;
    }
    assert_eq!(pos, size, "the extents cover the disk");
    for w in extents.windows(2) {
        assert!(
            w[0]["state"] != w[1]["state"] || w[0]["layer"] != w[1]["layer"],
            "adjacent extents that should be one: {} {}",
            w[0],
            w[1]
        );
    }
    (header, extents)
}

/// The character `map --visual` shows for one extent.
fn glyph(e: &Value) -> char {
    match (e["state"].as_str(), e["layer"].as_u64()) {
        (Some("data"), Some(0)) => '#',
        (Some("data"), Some(l)) if l <= 9 => char::from_digit(l as u32, 10).unwrap(),
        (Some("data"), Some(_)) => 'p',
        (Some("zero"), Some(_)) => '.',
        (Some("zero"), None) => ' ',
        _ => panic!("unexpected extent {e}"),
    }
}

/// The grid of `map --visual`: cell bytes (from the scale line) and the cells, row by row,
/// after checking the rows' offsets and the picture's width.
fn grid(out: &str, width: usize) -> (u64, Vec<String>) {
    // The title, the rows, an empty line, then the scale and the legend.
    let scale = out
        .lines()
        .skip_while(|l| !l.is_empty())
        .nth(1)
        .expect("a scale line under the grid");
    assert!(scale.starts_with("one cell = "), "{scale}");
    let cell_bytes: u64 = scale
        .rsplit_once("(= ")
        .and_then(|(_, r)| r.strip_suffix(" bytes)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no scale in {scale:?}"));
    let mut rows = Vec::new();
    for line in out.lines().skip(1).take_while(|l| !l.is_empty()) {
        assert!(
            line.chars().count() <= width,
            "{line:?} is wider than {width}"
        );
        let (label, cells) = line.split_once(" |").expect("LABEL |CELLS|");
        let cells = cells.strip_suffix('|').expect("closing bar");
        rows.push((label.trim().to_string(), cells.to_string()));
    }
    assert!(!rows.is_empty() && rows.len() <= 32, "{} rows", rows.len());
    let cols = rows[0].1.chars().count() as u64;
    for (i, (label, cells)) in rows.iter().enumerate() {
        assert_eq!(
            *label,
            format!("{:#x}", i as u64 * cols * cell_bytes),
            "row {i}"
        );
        if i + 1 < rows.len() {
            assert_eq!(cells.chars().count() as u64, cols, "row {i}");
        }
    }
    (cell_bytes, rows.into_iter().map(|(_, c)| c).collect())
}

/// The cells the extents make: one character per `cell_bytes`, `+` where kinds mix.
fn expected_cells(extents: &[Value], size: u64, cell_bytes: u64) -> String {
    let mut cells: Vec<Option<char>> = vec![None; size.div_ceil(cell_bytes) as usize];
    for e in extents {
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        for c in start / cell_bytes..=(end - 1) / cell_bytes {
            let cell = &mut cells[c as usize];
            *cell = match *cell {
                None => Some(glyph(e)),
                Some(g) if g == glyph(e) => Some(g),
                Some(_) => Some('+'),
            };
        }
    }
    cells.into_iter().map(|c| c.expect("every cell")).collect()
}

/// `map --visual --width 40` shows what `map --output json` says, cell by cell; returns the
/// cells.
fn visual_matches_json(img: &Path) -> String {
    let (header, extents) = map_json(img);
    let size = header["virtual_size"].as_u64().unwrap();
    let o = vd_ok(&["map", "--visual", "--width", "40", s(img)]);
    let out = stdout(&o);
    let (cell_bytes, rows) = grid(&out, 40);
    let drawn: String = rows.concat();
    assert_eq!(
        drawn,
        expected_cells(&extents, size, cell_bytes),
        "{}:\n{out}",
        img.display()
    );
    // The legend names every kind, and every layer of the chain.
    for needle in [
        "#  data in this image",
        ".  zeros",
        "   unmapped",
        "+  partly present",
    ] {
        assert!(out.contains(needle), "legend lacks {needle:?}:\n{out}");
    }
    for l in header["layers"].as_array().unwrap().iter().skip(1) {
        let n = l["layer"].as_u64().unwrap();
        assert!(
            out.contains(&format!("{n}  data from parent layer {n}")),
            "{out}"
        );
    }
    // Not a terminal: no colour unless asked; asked, the same picture in colour.
    assert!(!out.contains('\x1b'), "{out}");
    let coloured = stdout(&vd_ok(&[
        "map",
        "--visual",
        "--width",
        "40",
        "--color",
        "always",
        s(img),
    ]));
    assert!(coloured.contains("\x1b["), "{coloured}");
    assert_eq!(strip_ansi(&coloured), out);
    drawn
}

/// `text` without ANSI SGR sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn visual_map_of_a_dynamic_image_shows_data_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), DYNAMIC);
    let cells = visual_matches_json(&img);
    assert!(cells.contains('#') && cells.contains('.'), "{cells:?}");
}

#[test]
fn visual_map_of_a_fixed_image_is_all_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), FIXED);
    let cells = visual_matches_json(&img);
    assert!(cells.chars().all(|c| c == '#'), "{cells:?}");
}

#[test]
fn visual_map_of_a_chain_shows_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), CHILD);
    let (header, extents) = map_json(&img);
    assert_eq!(
        header["layers"].as_array().map(Vec::len),
        Some(2),
        "{header}"
    );
    // The child holds some sectors, the parent the rest of those blocks.
    for layer in [0, 1] {
        assert!(
            extents
                .iter()
                .any(|e| e["state"] == "data" && e["layer"] == layer),
            "no data in layer {layer}"
        );
    }
    let cells = visual_matches_json(&img);
    assert!(cells.contains('+'), "{cells:?}");
}

#[test]
fn visual_map_options() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), FIXED);
    // COLUMNS sets the width when --width is not given.
    let o = std::process::Command::new(vd_tests::vd_tool_bin!())
        .args(["map", "--visual", s(&img)])
        .env("COLUMNS", "30")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    grid(&stdout(&o), 30);
    // Without it (and not on a terminal), 80 columns.
    let o = std::process::Command::new(vd_tests::vd_tool_bin!())
        .args(["map", "--visual", s(&img)])
        .env_remove("COLUMNS")
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(
        out.lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .all(|l| l.len() <= 80)
    );
    // --width needs --visual, and a picture is not JSON.
    assert_eq!(
        vd(&["map", "--width", "40", s(&img)]).status.code(),
        Some(2)
    );
    let o = vd(&["--output", "json", "map", "--visual", s(&img)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--visual"), "{}", stderr(&o));
}

#[test]
fn map_json_is_one_extent_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), DYNAMIC);
    let o = vd_ok(&["map", "--output", "json", s(&img)]);
    let text = stdout(&o);
    let (header, extents) = map_json(&img);
    assert_eq!(
        text.lines().count(),
        extents.len() + 1,
        "header + one line per extent"
    );
    assert_eq!(header["file"], s(&img));
    assert_eq!(header["layers"][0]["format"], "vhdx");
    // The human table lists the same extents.
    let human = stdout(&vd_ok(&["map", s(&img)]));
    assert_eq!(human.lines().count(), extents.len() + 1, "{human}");
    for (line, e) in human.lines().skip(1).zip(&extents) {
        let start = format!("{:#x}", e["start"].as_u64().unwrap());
        assert!(line.starts_with(&start), "{line} vs {e}");
        assert!(line.contains(e["state"].as_str().unwrap()), "{line} vs {e}");
    }
}

/// `layout --output json` of `img`, after checking that its regions are sorted, do not
/// overlap and cover the file exactly (free space included).
fn layout_json(img: &Path) -> Value {
    let v: Value = serde_json::from_slice(&vd_ok(&["layout", "--output", "json", s(img)]).stdout)
        .expect("layout prints JSON");
    assert_eq!(v["schema_version"], 1);
    let file_size = std::fs::metadata(img).unwrap().len();
    assert_eq!(v["file_size"], file_size);
    let mut pos = 0;
    for r in v["regions"].as_array().expect("regions") {
        let (off, len) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        assert_eq!(off, pos, "sorted, no gaps and no overlaps: {r}");
        assert!(len > 0, "{r}");
        pos = off + len;
    }
    assert_eq!(
        pos, file_size,
        "the regions lie within the file and cover it"
    );
    v
}

/// The regions of `kind`, as (offset, length).
fn of_kind(layout: &Value, kind: &str) -> Vec<(u64, u64)> {
    layout["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

/// Offsets of the payload and sector-bitmap blocks, read from the BAT in the file's bytes.
fn blocks_in_file(b: &[u8]) -> (Vec<u64>, Vec<u64>, u64) {
    let params = meta_item(b, META_FILE_PARAMETERS);
    let block_size = u64::from(u32_at(b, params));
    let has_parent = u32_at(b, params + 4) & 2 != 0;
    let sector = u64::from(u32_at(b, meta_item(b, META_LOGICAL_SECTOR_SIZE)));
    let size = u64_at(b, meta_item(b, META_VIRTUAL_DISK_SIZE));
    let ratio = (1u64 << 23) * sector / block_size;
    let blocks = size.div_ceil(block_size);
    let entry = |i: u64| u64_at(b, bat_entry(b, usize_of(i)));
    let mut payload = Vec::new();
    for blk in 0..blocks {
        let e = entry(blk + blk / ratio);
        if matches!(e & 7, 6 | 7) {
            payload.push(e >> 20 << 20);
        }
    }
    let mut bitmaps = Vec::new();
    if has_parent {
        for c in 0..blocks.div_ceil(ratio) {
            let e = entry(c * (ratio + 1) + ratio);
            if e & 7 == 6 {
                bitmaps.push(e >> 20 << 20);
            }
        }
    }
    (payload, bitmaps, block_size)
}

/// The layout of `img` says what the file's own bytes say.
fn layout_matches_file(img: &Path) -> Value {
    let v = layout_json(img);
    let b = std::fs::read(img).unwrap();
    let headers: Vec<_> = v["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "header")
        .collect();
    assert_eq!(headers.len(), 2);
    for (i, h) in headers.iter().enumerate() {
        assert_eq!(h["copy"], i + 1);
        assert_eq!(h["offset"], HEADERS[i] as u64);
    }
    let (s0, s1) = (
        u64_at(&b, HEADERS[0] + H_SEQUENCE),
        u64_at(&b, HEADERS[1] + H_SEQUENCE),
    );
    if s0 != s1 {
        let newer = usize::from(s1 > s0);
        assert!(
            headers[newer]["label"]
                .as_str()
                .unwrap()
                .contains("in force"),
            "{headers:?}"
        );
    }
    let tables = of_kind(&v, "region_table");
    assert_eq!(tables, vec![(0x30000, 0x10000), (0x40000, 0x10000)]);
    let (log, log_len) = log_region(&b);
    assert_eq!(of_kind(&v, "log"), vec![(log as u64, log_len as u64)]);
    let (bat, bat_len) = region(&b, REGION_BAT);
    assert_eq!(of_kind(&v, "bat"), vec![(bat as u64, bat_len as u64)]);
    let (meta, meta_len) = region(&b, REGION_METADATA);
    assert_eq!(
        of_kind(&v, "metadata"),
        vec![(meta as u64, meta_len as u64)]
    );

    let (payload, bitmaps, block_size) = blocks_in_file(&b);
    for (kind, offsets, unit) in [
        ("payload", &payload, block_size),
        ("sector_bitmap", &bitmaps, 1 << 20),
    ] {
        let runs: Vec<&Value> = v["regions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == kind)
            .collect();
        let counted: u64 = runs.iter().map(|r| r["blocks"].as_u64().unwrap()).sum();
        assert_eq!(counted, offsets.len() as u64, "{kind} blocks");
        let bytes: u64 = runs.iter().map(|r| r["length"].as_u64().unwrap()).sum();
        assert_eq!(
            bytes,
            offsets.len() as u64 * unit,
            "{kind} runs are whole blocks"
        );
        for &off in offsets.iter() {
            assert!(
                runs.iter().any(|r| {
                    let o = r["offset"].as_u64().unwrap();
                    o <= off && off + unit <= o + r["length"].as_u64().unwrap()
                }),
                "{kind} block at {off:#x} is in no run"
            );
        }
    }
    v
}

#[test]
fn layout_of_a_dynamic_image_matches_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), DYNAMIC);
    let v = layout_matches_file(&img);
    assert!(!of_kind(&v, "payload").is_empty());
    // The human table lists the same regions, in hex, with the bar under it.
    let human = stdout(&vd_ok(&["layout", s(&img)]));
    for r in v["regions"].as_array().unwrap() {
        let start = format!("{:#x}", r["offset"].as_u64().unwrap());
        assert!(
            human.lines().any(|l| l.starts_with(&format!("{start} "))),
            "{start} missing:\n{human}"
        );
    }
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("|#") || l.starts_with("|-")),
        "{human}"
    );
}

#[test]
fn layout_of_a_differencing_image_shows_sector_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), CHILD);
    let v = layout_matches_file(&img);
    assert!(!of_kind(&v, "sector_bitmap").is_empty(), "{v}");
}

#[test]
fn layout_of_a_fixed_and_a_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = corpus(dir.path(), FIXED);
    layout_matches_file(&img);
    // A raw image is one payload region, the file itself.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 3 << 20]).unwrap();
    let v = layout_json(&raw);
    assert_eq!(of_kind(&v, "payload"), vec![(0, 3 << 20)]);
    assert_eq!(v["format"], "raw");
}
