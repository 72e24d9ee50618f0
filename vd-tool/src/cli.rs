//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Inspect, probe, check, create and convert virtual disk images.
#[derive(Debug, Parser)]
#[command(
    name = "vd-tool",
    version,
    about = "Inspect, probe, check, create and convert virtual disk images.",
    long_about = "Inspect, probe, check, create and convert virtual disk images.\n\n\
        Results go to stdout, logs and errors to stderr. With --output json every command prints \
        one JSON document with a \"schema_version\" field; fields are only ever added within a \
        schema version. Exit codes: 0 success, 1 problems or differences found, 2 error \
        (including usage errors and missing files). Against qemu-img's: qemu-img check's 2 \
        (corruptions) and 3 (leaks) are vd's 1, its 1 (check not completed) vd's 2; qemu-img \
        compare's 0 (same), 1 (different) and 2 (error) are vd's too; other qemu-img commands \
        exit 1 on an error where vd exits 2.\n\n\
        Numbers are read as qemu reads them: offsets, lengths and sizes in decimal or 0x hex, or \
        with a K, M, G, T, P or E suffix (1024-based) and decimals (1.5G); byte patterns as \
        0 to 255 or 0x00 to 0xff."
)]
pub struct Cli {
    /// More log output on stderr (-v, -vv, -vvv); RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// How results are printed on stdout: text for people, or one JSON document.
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// One JSON document.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the image backends in probe order.
    Backends,
    /// Tell which backend claims a file, and how sure it is.
    Probe {
        /// The file to probe.
        file: PathBuf,
    },
    /// Show facts about an image.
    Info(InfoArgs),
    /// Copy an image into another format (holes stay holes).
    Convert(ConvertArgs),
    /// Show which ranges hold data, which read as zeros, and which image of the chain holds
    /// them.
    Map(MapArgs),
    /// Show where each structure lies in the image file: headers, tables, log, blocks, free
    /// space.
    Layout(LayoutArgs),
    /// Describe every on-disk structure of an image.
    Dump(DumpArgs),
    /// Compare the contents of two images (exit 0 identical, 1 different, 2 error).
    Compare(CompareArgs),
    /// Create a new image.
    Create(CreateArgs),
    /// Read, write, discard and flush an image, like qemu-io.
    Io(IoArgs),
    /// Check an image for problems (exit 0 clean, 1 problems found, 2 error).
    Check(CheckArgs),
    /// Change the virtual size: `SIZE`, `+SIZE` or `-SIZE`.
    Resize(ResizeArgs),
    /// Discard a range so that it reads as zeros (whole blocks are released).
    Discard(DiscardArgs),
    /// Merge a differencing image into its parent.
    Commit(CommitArgs),
    /// Set the image UUIDs (a new random image UUID when none is given).
    ///
    /// Setting the image UUID or the parent UUID changes only the image's FileWriteGuid, so
    /// differencing images made from this one still open. `--modification-uuid` sets the
    /// DataWriteGuid, the identity children made from this image record: they no longer open
    /// until relinked with `setuuid --parent-uuid`.
    Setuuid(SetuuidArgs),
    /// Show or set the CHS geometry.
    ///
    /// VHDX has no geometry field: vd keeps it in a user metadata item of its own. Children of
    /// the image stay valid (only the FileWriteGuid changes) and qemu-img and libvhdi read the
    /// image as before, but dissect.hypervisor (3.21) cannot open a VHDX holding a metadata item
    /// it does not know.
    Geometry(GeometryArgs),
    /// Show or set the comment.
    ///
    /// The comment is kept in a user metadata item of vd's own. Children of the image stay valid
    /// (only the FileWriteGuid changes) and qemu-img and libvhdi read the image as before, but
    /// dissect.hypervisor (3.21) cannot open a VHDX holding a metadata item it does not know;
    /// `--clear` removes the item again.
    Comment(CommentArgs),
    /// Move data down into holes and shrink the file.
    Compact(FileArgs),
    /// Time COUNT sequential requests of SIZE bytes (like `qemu-img bench`).
    Bench(BenchArgs),
    /// Export the whole disk (chain, dirty log replayed) over NBD until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Show the virtual disk and its partitions as raw files in a directory (FUSE), until
    /// unmounted or interrupted.
    Mount(MountArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a directory.
    Man {
        /// Write vd-tool.1 and vd-tool-COMMAND.1 for every command into this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
#[command(
    after_help = "The export is read-only unless --writable: clients see NBD_FLAG_READ_ONLY, \
    writes get EPERM, and the file is never changed (a dirty log is replayed in memory). Several \
    clients may connect at once (up to 16); they share one opened disk, so a flush from any of \
    them flushes everything written. On SIGINT or SIGTERM the server stops accepting, lets each \
    client finish its request, flushes and closes the image cleanly, and removes the socket."
)]
pub struct ServeArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Accept writes (otherwise the export is read-only).
    #[arg(long)]
    pub writable: bool,
    /// Listen on this Unix socket (created; removed again on exit).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "port",
        required_unless_present = "port"
    )]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP port.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// With --port: the address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub bind: String,
    /// The export's name (clients may also ask for the default export, "").
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export_name: String,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `mount`.
#[derive(Debug, Args)]
#[command(
    after_help = "MOUNTPOINT/disk is the whole virtual disk; p1, p2, ... are the \
partitions of its GPT or MBR table, as Linux numbers them (mount -o loop,ro MOUNTPOINT/p1 DIR \
opens a file system inside). Read-only unless --writable; a dirty log is then replayed in \
memory and the image file is not changed. The command stays in the foreground until the \
mount is unmounted (fusermount3 -u MOUNTPOINT, umount) or it gets SIGINT or SIGTERM, which \
unmount it; then the image is closed cleanly. Mounting needs /dev/fuse, and fusermount3 \
(package fuse3) when not root."
)]
pub struct MountArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Let writes through into the image (files mode 0644; fsync flushes the image).
    #[arg(long)]
    pub writable: bool,
    /// Let other users use the mount (FUSE's allow_other).
    #[arg(long)]
    pub allow_other: bool,
    /// The image.
    pub file: PathBuf,
    /// An existing directory to mount on.
    pub mountpoint: PathBuf,
}

/// Arguments of `bench`.
#[derive(Debug, Args)]
#[command(
    after_help = "Requests go out in qemu-img bench's order: the first at OFFSET, each next \
    one STEP further, back to OFFSET when the next would pass the end of the disk. vd's I/O is \
    synchronous, so the requests in flight are the worker threads: -t N runs N threads sharing \
    one opened disk, each taking the next request when its last one is done; -d N (qemu's queue \
    depth) without -t runs N threads, and with -t it changes nothing. Note that qemu-img's -t \
    is its cache mode (vd always goes through the page cache, like qemu's -t writeback)."
)]
pub struct BenchArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Number of requests.
    #[arg(short = 'c', long, default_value_t = 75000)]
    pub count: u64,
    /// Request size (decimal or 0x hex bytes, or with a K-E suffix and decimals).
    #[arg(short = 's', long = "buffer-size", default_value = "4K")]
    pub size: String,
    /// Distance between request starts (default: the request size).
    #[arg(short = 'S', long = "step-size")]
    pub step: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', long, default_value = "0")]
    pub offset: String,
    /// Worker threads sharing the opened disk, one request in flight each [default: 1, or
    /// DEPTH].
    #[arg(short = 't', long, value_name = "THREADS",
          value_parser = clap::value_parser!(u16).range(1..=MAX_BENCH_THREADS))]
    pub threads: Option<u16>,
    /// Requests in flight (qemu-img's queue depth): the number of threads when -t is not
    /// given.
    #[arg(short = 'd', long, value_name = "DEPTH",
          value_parser = clap::value_parser!(u16).range(1..=MAX_BENCH_THREADS))]
    pub depth: Option<u16>,
    /// Write instead of read.
    #[arg(short = 'w', long)]
    pub write: bool,
    /// Write this byte, in decimal or 0x hex.
    #[arg(long, default_value = "0xa5", value_parser = parse_pattern)]
    pub pattern: u8,
    /// With -w: flush after every this many requests, counted over all threads (0: only at
    /// the end).
    #[arg(long, default_value_t = 0)]
    pub flush_interval: u64,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
}

/// The most worker threads `bench` runs.
pub const MAX_BENCH_THREADS: i64 = 1024;

impl BenchArgs {
    /// Worker threads: `-t`, else `-d`, else 1.
    pub fn thread_count(&self) -> u16 {
        self.threads.or(self.depth).unwrap_or(1)
    }
}

/// A byte in decimal (`165`) or hexadecimal with a `0x` prefix (`0xa5`).
fn parse_pattern(s: &str) -> Result<u8, String> {
    vd_core::parse_byte(s).map_err(|e| e.to_string())
}

/// `-U`: read an image another process is writing.
#[derive(Debug, Args)]
pub struct ShareArgs {
    /// Open read-only without the lock that keeps writers out, so an image another process
    /// (a VM, qemu-io) has open for writing can be read; what is read may change meanwhile
    /// (qemu-img's -U).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl ShareArgs {
    /// Flags for a read-only open.
    pub fn read_only(&self) -> vd_core::OpenFlags {
        if self.force_share {
            vd_core::OpenFlags::READ_ONLY | vd_core::OpenFlags::FORCE_SHARE
        } else {
            vd_core::OpenFlags::READ_ONLY
        }
    }
}

/// An image and its format.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Allow making the disk smaller (refused when the part cut off holds data).
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: discard the part cut off first, even when it holds data.
    #[arg(long, requires = "shrink")]
    pub force: bool,
    /// The new size, or `+SIZE` / `-SIZE` relative to the current one (decimal or 0x hex bytes,
    /// or with a K, M, G, T, P or E suffix and decimals: 1.5G).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// Arguments of `discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Start of the range: bytes in decimal or 0x hex, or with a K, M, G, T, P or E suffix
    /// (1024-based) and decimals (1.5M).
    pub offset: String,
    /// Length of the range, in the same syntax.
    pub length: String,
}

/// Arguments of `commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The differencing image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Show a progress bar on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
}

/// Arguments of `setuuid`.
#[derive(Debug, Args)]
pub struct SetuuidArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// The image UUID (VHDX: the virtual disk id).
    #[arg(long)]
    pub uuid: Option<String>,
    /// The modification UUID (VHDX: DataWriteGuid).
    #[arg(long)]
    pub modification_uuid: Option<String>,
    /// The parent UUID (VHDX: parent_linkage): relinks a differencing image to a parent whose
    /// data changed since the child was made. Check first that it is the right parent.
    #[arg(long)]
    pub parent_uuid: Option<String>,
}

/// Arguments of `geometry`.
#[derive(Debug, Args)]
pub struct GeometryArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Set the physical geometry, `C/H/S`.
    #[arg(long)]
    pub pchs: Option<String>,
    /// Set the logical geometry, `C/H/S`.
    #[arg(long)]
    pub lchs: Option<String>,
}

/// Arguments of `comment`.
#[derive(Debug, Args)]
pub struct CommentArgs {
    /// The image.
    #[command(flatten)]
    pub image: FileArgs,
    /// Set this comment.
    #[arg(long, conflicts_with = "clear")]
    pub set: Option<String>,
    /// Remove the comment.
    #[arg(long)]
    pub clear: bool,
}

/// Arguments of `check`.
#[derive(Debug, Args)]
#[command(
    override_usage = "vd-tool check [OPTIONS] [-r [leaks|all]] FILE",
    after_help = "Repair levels (-r, as qemu-img check -r): vd has no leak repair of its own \
    (VHDX keeps no reference counts, so no cluster can leak; in a VHD, unused space with room \
    for a block right before the footer is cut off behind the footer, other unused space is \
    reported and left to compact), and any repair opens the image read-write, which \
    replays a dirty log and rewrites what vd repairs from a good copy. So -r leaks repairs \
    the same as -r all, as qemu-img check -r leaks does on VHDX (its read-write open replays \
    the log too); -r alone is -r all.\n\n\
    Exit codes: 0 clean (or everything found was repaired), 1 problems found (corruptions or \
    leaks: qemu-img check's 2 and 3), 2 error: the check could not be completed, a usage error \
    or a missing file (qemu-img check's 1)."
)]
pub struct CheckArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Repair what is safe: `-r`, `-r all` or `-r leaks` (the same in vd; see below).
    #[arg(
        short = 'r',
        long = "repair",
        value_name = "LEVEL",
        num_args = 0..=1,
        default_missing_value = "all"
    )]
    pub repair: Option<String>,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
    /// The image.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// How much `check -r` repairs (qemu-img check's `-r leaks|all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairLevel {
    /// `-r leaks`: in vd the same as `All` (no format of vd's can leak).
    Leaks,
    /// `-r` or `-r all`: everything that is safe.
    All,
}

impl CheckArgs {
    /// The repair level and the image. `-r FILE` takes FILE as `-r`'s value (clap cannot look
    /// ahead), so a value that is not a level is the image when no other is given.
    ///
    /// # Errors
    /// No image, or a level that is neither `leaks` nor `all`.
    pub fn repair_and_file(&self) -> anyhow::Result<(Option<RepairLevel>, &std::path::Path)> {
        let level = |v: &str| match v {
            "leaks" => Some(RepairLevel::Leaks),
            "all" => Some(RepairLevel::All),
            _ => None,
        };
        match (self.repair.as_deref(), self.file.as_deref()) {
            (None, Some(f)) => Ok((None, f)),
            (Some(r), Some(f)) => match level(r) {
                Some(l) => Ok((Some(l), f)),
                None => anyhow::bail!("-r {r:?}: the repair levels are leaks and all"),
            },
            (Some(r), None) if level(r).is_none() => {
                Ok((Some(RepairLevel::All), std::path::Path::new(r)))
            }
            (_, None) => {
                anyhow::bail!("check: no image given (vd-tool check [-r [leaks|all]] FILE)")
            }
        }
    }
}

/// Arguments of `create`.
#[derive(Debug, Args)]
#[command(
    override_usage = "vd-tool create -f FORMAT [OPTIONS] FILE [SIZE]\n       \
    vd-tool create [-f FORMAT] -o help"
)]
pub struct CreateArgs {
    /// Image format (vhdx, vhd, raw).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format options, `key=value,...`; `-o help` lists each format's options with their
    /// values and defaults (only FORMAT's with -f).
    #[arg(short = 'o', long = "options")]
    pub options: Option<String>,
    /// Create a differencing image over this parent.
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<PathBuf>,
    /// Format of the parent (otherwise probed).
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Replace the file if it exists (only a regular file; it is replaced once the new image is
    /// complete).
    #[arg(long)]
    pub force: bool,
    /// The new image.
    pub file: Option<PathBuf>,
    /// Virtual size: bytes in decimal or 0x hex, or with a K, M, G, T, P or E suffix
    /// (1024-based) and decimals (1.5G); defaults to the parent's size.
    pub size: Option<String>,
}

/// Arguments of `io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Lock sharing (with -r).
    #[command(flatten)]
    pub share: ShareArgs,
    /// A command: `read [-P PATTERN] OFF LEN`, `write [-P PATTERN | -z] OFF LEN`,
    /// `discard OFF LEN`, `flush`, `sleep MS` (keep the image open). Repeat for more. OFF and
    /// LEN in decimal or 0x hex, or with a K-E suffix and decimals (`0x100000 1.5M`); PATTERN a
    /// byte, `90` or `0x5a`.
    #[arg(short = 'c', long = "cmd", required = true)]
    pub commands: Vec<String>,
    /// The image.
    pub file: PathBuf,
}

/// Options shared by the commands that open an image with its backing chain.
#[derive(Debug, Args)]
pub struct ChainArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The parent image, bypassing the child's locator; repeat for grandparents.
    #[arg(long = "parent")]
    pub parents: Vec<PathBuf>,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
}

/// Arguments of `map`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
With --output json, map prints JSON Lines, streamed as the disk is mapped, so a disk of any \
size never builds one large document. The first line is a header:
  {\"schema_version\":1,\"format\":\"jsonl\",\"file\":F,\"virtual_size\":N,
   \"layers\":[{\"layer\":0,\"file\":F,\"format\":\"vhdx\"},...]}
then one line per extent, in disk order, contiguous and covering the whole disk:
  {\"start\":N,\"length\":N,\"state\":\"data\"|\"zero\",\"layer\":N,\"file\":F}
layer and file name the image of the chain holding the range (0 = the image named); they are \
absent for zeros no image stores. Adjacent extents differ in state or layer.

--visual draws the whole disk as a grid instead, one character per cell (the scale and a \
legend are printed under it): # data in this image, 1-9 (p beyond) data from that parent \
layer, . zeros an image stores, space for ranges no image holds, + a cell mixing kinds.

Examples:
  vd-tool map disk.vhdx
  vd-tool map --visual child.vhdx
  vd-tool --output json map disk.vhdx | jq -c 'select(.state == \"data\")'")]
pub struct MapArgs {
    /// How to open the image.
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Draw the disk as a grid of cells, with a legend and the scale.
    #[arg(long)]
    pub visual: bool,
    /// With --visual: columns to draw in [default: $COLUMNS, the terminal's width, or 80].
    #[arg(long, requires = "visual", value_parser = clap::value_parser!(u16).range(20..=1000))]
    pub width: Option<u16>,
    /// With --visual: colour the cells (auto: when stdout is a terminal and NO_COLOR is not
    /// set).
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// The image.
    pub file: PathBuf,
}

/// When to colour output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal and NO_COLOR is unset or empty.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// Arguments of `layout`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Lists, sorted by offset, every structure of the image file with its offset and length (hex) \
and size: for VHDX the file identifier, both headers and region tables (the copies in force \
marked), the log, the BAT, the metadata region, runs of payload and sector-bitmap blocks \
(adjacent blocks merged), and the free space between them; a bar under the table shows the \
file. With --output json: {\"schema_version\":1,\"file\":F,\"format\":\"vhdx\",\"file_size\":N,\
\"regions\":[{\"kind\":\"header\",\"copy\":1,\"offset\":N,\"length\":N,\"label\":S},...]}, kinds \
file_identifier, header, region_table, reserved, log, bat, metadata, payload, sector_bitmap, \
other and free; runs of blocks carry \"blocks\". Regions are sorted and do not overlap.

Example:
  vd-tool layout disk.vhdx")]
pub struct LayoutArgs {
    /// Image format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format_a: Option<String>,
    /// Format of the second image (otherwise probed).
    #[arg(short = 'F', long = "second-format")]
    pub format_b: Option<String>,
    /// Images of different sizes are different, even when the extra part is zeros.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Show a progress bar on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
    /// The first image.
    pub first: PathBuf,
    /// The second image.
    pub second: PathBuf,
}

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// With --backing-chain: the parent image, bypassing the child's locator; repeat for
    /// grandparents.
    #[arg(long = "parent")]
    pub parents: Vec<PathBuf>,
    /// Also show every image of the backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    /// Lock sharing.
    #[command(flatten)]
    pub share: ShareArgs,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `convert`.
#[derive(Debug, Args)]
#[command(
    override_usage = "vd-tool convert [OPTIONS] -O FORMAT SOURCE DESTINATION\n       \
        vd-tool convert [-O FORMAT] -o help",
    after_help = "As qemu-img convert: -S sets the sparse threshold, -n writes into an existing \
    image, --target-is-zero (with -n) skips writing zeros, -B makes the output a differencing \
    image over a backing file. -W is accepted: vd's copy engine always writes out of order, \
    with several workers (a stream destination is written in order)."
)]
pub struct ConvertArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format of the new image (`vd-tool backends` lists them).
    #[arg(short = 'O', long = "output-format")]
    pub output_format: Option<String>,
    /// Options of the new image, `key=value,...`; `-o help` lists each format's options with
    /// their values and defaults (only FORMAT's with -O).
    #[arg(short = 'o', long = "options")]
    pub options: Option<String>,
    /// Show a progress bar on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Sparse threshold: runs of zeros this long (on multiples of it on the disk) in the data
    /// read are left as holes (ranges the source maps as zeros always are); a power of two
    /// from 512 to 4M [default: 4K]. `-S 0` writes every byte, zeros included: the new image
    /// is fully allocated.
    #[arg(short = 'S', long = "sparse-size", value_name = "SIZE")]
    pub sparse_size: Option<String>,
    /// Do not create the destination: write into an existing image of the -O format, at least
    /// as large as the source (checked before anything is written). It is opened for writing
    /// (locked) and written in place; every range is written, zeros included.
    #[arg(short = 'n', long = "no-create", conflicts_with = "backing")]
    pub no_create: bool,
    /// With -n: the destination reads as zeros already, so zeros are not written.
    #[arg(long, requires = "no_create")]
    pub target_is_zero: bool,
    /// Allow out-of-order writes (accepted for qemu-img compatibility: vd always does).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Make the new image a differencing image over BACKING (its format probed): only the
    /// data that differs from BACKING's is written. Needs an output format that has
    /// differencing images (vhdx, vhd).
    #[arg(short = 'B', long = "backing", value_name = "BACKING")]
    pub backing: Option<PathBuf>,
    /// The source's parent image, bypassing the child's locator; repeat for grandparents.
    #[arg(long = "parent")]
    pub parents: Vec<PathBuf>,
    /// Lock sharing (of the source).
    #[command(flatten)]
    pub share: ShareArgs,
    /// The source image.
    pub source: Option<PathBuf>,
    /// Where to write. A regular file is replaced only once the new image is complete (it is
    /// built beside it); with `-O raw`, a block device is written in place (it must be large
    /// enough), and `-`, a FIFO or a character device (`/dev/stdout`) receive the disk as one
    /// stream. Never the source or a file of its chain.
    pub destination: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_patterns_go_through_the_byte_parser() {
        // The parser's cases are vd_core::numbers' tests; this checks bench uses it.
        let pattern = |p: &str| {
            let cli = Cli::try_parse_from(["vd-tool", "bench", "--pattern", p, "x"]).ok()?;
            let Command::Bench(b) = cli.command else {
                unreachable!()
            };
            Some(b.pattern)
        };
        assert_eq!(pattern("0x5a"), Some(0x5a));
        assert_eq!(pattern("165"), Some(0xa5));
        assert_eq!(pattern("256"), None);
    }

    #[test]
    fn bench_threads_come_from_t_then_d() {
        let threads = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(["vd-tool", "bench"].iter().chain(args).chain(&["x"])).unwrap();
            let Command::Bench(b) = cli.command else {
                unreachable!()
            };
            b.thread_count()
        };
        assert_eq!(threads(&[]), 1);
        assert_eq!(threads(&["-d", "2"]), 2);
        assert_eq!(threads(&["-t", "3", "-d", "8"]), 3);
        assert_eq!(threads(&["--threads", "4"]), 4);
        for bad in [["-t", "0"], ["-d", "0"], ["-t", "1025"]] {
            assert!(Cli::try_parse_from(["vd-tool", "bench", bad[0], bad[1], "x"]).is_err());
        }
    }
}
