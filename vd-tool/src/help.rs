//! The help around clap's definitions: the commands listed in groups, an example in every long
//! help. Completions and the man page are made from the same [`command`], so they cannot drift
//! from what the parser accepts.

use clap::CommandFactory;

use crate::cli::Cli;

/// The command groups of the top-level help, in order. Every subcommand is in exactly one
/// (a unit test checks it).
pub const GROUPS: &[(&str, &[&str])] = &[
    (
        "Inspect",
        &[
            "backends", "probe", "info", "map", "layout", "dump", "compare",
        ],
    ),
    ("Create and convert", &["create", "convert"]),
    (
        "Maintain",
        &[
            "check", "resize", "discard", "compact", "commit", "setuuid", "geometry", "comment",
        ],
    ),
    ("Serve", &["serve", "mount"]),
    ("Test", &["io", "bench"]),
    ("Shell", &["completions", "man", "help"]),
];

/// Examples shown at the end of each subcommand's long help (`--help`, not `-h`).
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "backends",
        "vd-tool backends\nvd-tool backends --output json",
    ),
    (
        "probe",
        "vd-tool probe unknown.bin      # which backend claims the file, and how sure it is",
    ),
    (
        "info",
        "vd-tool info disk.vhdx\n\
         vd-tool info --backing-chain child.vhdx\n\
         vd-tool info -U --output json running-vm.vhdx   # while a VM writes it",
    ),
    (
        "map",
        "vd-tool map disk.vhdx\n\
         vd-tool map --visual disk.vhdx              # the disk as a grid of blocks\n\
         vd-tool map --output json disk.vhdx | head  # JSON Lines: a header, then one extent each\n\
         vd-tool map --parent base.vhdx child.vhdx   # the parent is not where the child says",
    ),
    (
        "layout",
        "vd-tool layout disk.vhdx                    # headers, log, BAT, blocks, free space\n\
         vd-tool layout --output json disk.vhdx",
    ),
    ("dump", "vd-tool dump disk.vhdx | less"),
    (
        "compare",
        "vd-tool compare disk.vhdx disk.raw && echo same\n\
         vd-tool compare -s a.vhdx b.vhdx            # a different size is a difference",
    ),
    (
        "create",
        "vd-tool create -f vhdx disk.vhdx 64G\n\
         vd-tool create -f vhdx -o subformat=fixed,block_size=1M fixed.vhdx 10G\n\
         vd-tool create -f vhdx -b base.vhdx child.vhdx   # a differencing image over base.vhdx\n\
         vd-tool create -f vhd -o azure=on disk.vhd 30G   # fixed, size rounded up to whole MiB\n\
         vd-tool create -f vhdx -o help                   # the options there are",
    ),
    (
        "convert",
        "vd-tool convert -O raw disk.vhdx disk.raw\n\
         vd-tool convert -p -O vhdx -o block_size=1M disk.raw disk.vhdx\n\
         vd-tool convert -O raw child.vhdx flat.raw     # a differencing chain, flattened\n\
         vd-tool convert -O vhd -o azure=on disk.vhdx azure.vhd  # for Azure: fixed VHD, same UUID\n\
         vd-tool convert -O raw disk.vhdx - | gzip > disk.raw.gz",
    ),
    (
        "check",
        "vd-tool check disk.vhdx; echo $?            # 0 clean, 1 problems, 2 error\n\
         vd-tool check -r disk.vhdx                  # repair what is safe (replays a dirty log)",
    ),
    (
        "resize",
        "vd-tool resize disk.vhdx 100G\n\
         vd-tool resize disk.vhdx +10G\n\
         vd-tool resize --shrink disk.vhdx -1G      # refused if the part cut off holds data",
    ),
    (
        "discard",
        "vd-tool discard disk.vhdx 1M 64M            # the range reads as zeros afterwards",
    ),
    ("compact", "vd-tool compact disk.vhdx"),
    (
        "commit",
        "vd-tool commit -p child.vhdx                # child's data into its parent",
    ),
    (
        "setuuid",
        "vd-tool setuuid disk.vhdx                   # a new random image UUID\n\
         vd-tool setuuid --parent-uuid 6d6f2a1c-0d4e-4b8e-9f3a-1c2d3e4f5a6b child.vhdx  # relink a child",
    ),
    (
        "geometry",
        "vd-tool geometry disk.vhdx\nvd-tool geometry --pchs 16383/16/63 disk.vhdx",
    ),
    (
        "comment",
        "vd-tool comment disk.vhdx\n\
         vd-tool comment --set 'web server, 2026-12' disk.vhdx\n\
         vd-tool comment --clear disk.vhdx",
    ),
    (
        "serve",
        "vd-tool serve --socket /tmp/disk.sock disk.vhdx\n\
         qemu-img convert -f raw 'nbd+unix:///?socket=/tmp/disk.sock' disk.raw\n\
         vd-tool serve --writable --port 10809 disk.vhdx",
    ),
    (
        "io",
        "vd-tool io -c 'write -P 0xab 0 1M' -c flush -c 'read -P 0xab 0 1M' disk.vhdx\n\
         vd-tool io -r -c 'read 0x100000 4K' disk.vhdx\n\
         vd-tool io -c 'write -z 1G 1G' -c 'discard 2G 1G' disk.vhdx",
    ),
    (
        "bench",
        "vd-tool bench -c 100000 -s 4K disk.vhdx       # 4 KiB reads\n\
         vd-tool bench -w -c 4096 -s 4K -S 1M disk.vhdx  # allocating writes\n\
         vd-tool bench -t 4 -s 1M -c 4096 disk.vhdx      # four threads",
    ),
    (
        "mount",
        "vd-tool mount disk.vhdx /mnt/vd &           # disk, p1, p2, ... in /mnt/vd\n\
         mount -o loop,ro /mnt/vd/p1 /mnt/p1         # the file system in partition 1\n\
         umount /mnt/p1; fusermount3 -u /mnt/vd      # vd-tool closes the image, exits\n\
         vd-tool mount --writable disk.vhdx /mnt/vd  # writes go into the image",
    ),
    (
        "completions",
        "vd-tool completions bash > /etc/bash_completion.d/vd-tool\n\
         vd-tool completions zsh > \"${fpath[1]}/_vd-tool\"\n\
         vd-tool completions fish > ~/.config/fish/completions/vd-tool.fish",
    ),
    (
        "man",
        "vd-tool man | man -l -\n\
         vd-tool man --dir /usr/local/share/man/man1  # vd-tool.1 and one page per command",
    ),
];

/// The language of `io -c`, for its long help.
const IO_LANGUAGE: &str = "\
Commands (-c, run in order; numbers in decimal or 0x hex, sizes with K, M, G, T, P or E):
  read [-P PATTERN] OFFSET LENGTH   read the range; with -P, fail unless every byte is PATTERN
  write [-P PATTERN | -z] OFFSET LENGTH
                                    write PATTERN (default 0xcd, as qemu-io) or, with -z,
                                    zeros (unallocated where the format allows)
  discard OFFSET LENGTH             release the range: it reads as zeros afterwards
  flush                             make every write so far durable
  sleep MS                          keep the image open (and locked) for MS milliseconds
The image is flushed and closed after the last command. A failing command stops the run
(exit 2); `read -P` finding other bytes exits 1.";

/// Overview at the end of the top-level long help.
const TOUR: &str = "\
Examples:
  vd-tool probe unknown.bin                 # what is this file?
  vd-tool info disk.vhdx                    # sizes, UUIDs, format facts
  vd-tool map disk.vhdx                     # where the data is
  vd-tool convert -p -O raw disk.vhdx disk.raw
  vd-tool check disk.vhdx

Run 'vd-tool COMMAND --help' for a command's options and examples.";

/// The command line with grouped help and examples: what `main` parses, and what completions
/// and the man page are made from.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let mut list = String::new();
    for (group, names) in GROUPS {
        list.push_str(group);
        list.push_str(":\n");
        for name in *names {
            let about = cmd
                .find_subcommand(name)
                .and_then(clap::Command::get_about)
                .map(ToString::to_string)
                .unwrap_or_else(|| "Print the help of vd-tool or of a command".into());
            list.push_str(&format!("  {name:<12} {about}\n"));
        }
        list.push('\n');
    }
    cmd = cmd
        .help_template(format!(
            "{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{list}Options:\n{{options}}\
             {{after-help}}"
        ))
        .after_long_help(TOUR);
    // clap drops the final period of a one-line summary (what -h shows) but keeps it in the
    // first line of a longer text (what --help shows): make the two open alike.
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, |sub| {
            let about = sub.get_about().map(ToString::to_string);
            let long = sub.get_long_about().map(ToString::to_string);
            match (about, long) {
                (Some(about), Some(long)) if long.starts_with(&format!("{about}.")) => {
                    let rest = &long[about.len().saturating_add(1)..];
                    sub.long_about(format!("{about}{rest}"))
                }
                _ => sub,
            }
        });
    }
    for (name, examples) in EXAMPLES {
        cmd = cmd.mut_subcommand(name, |sub| {
            let mut text = String::new();
            if let Some(before) = sub.get_after_help() {
                text.push_str(&before.to_string());
                text.push_str("\n\n");
            }
            if *name == "io" {
                text.push_str(IO_LANGUAGE);
                text.push_str("\n\n");
            }
            text.push_str("Examples:\n");
            for line in examples.lines() {
                text.push_str("  ");
                text.push_str(line);
                text.push('\n');
            }
            sub.after_long_help(text)
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subcommands clap knows, without its own `help`.
    fn subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect()
    }

    #[test]
    fn every_command_is_in_exactly_one_group() {
        let grouped: Vec<&str> = GROUPS
            .iter()
            .flat_map(|(_, names)| names.iter().copied())
            .collect();
        for name in subcommands() {
            let n = grouped.iter().filter(|g| **g == name).count();
            assert_eq!(n, 1, "{name} is in {n} groups");
        }
        let known = subcommands();
        for g in grouped {
            assert!(
                g == "help" || known.iter().any(|k| k == g),
                "group lists unknown {g}"
            );
        }
    }

    #[test]
    fn every_command_has_examples_in_its_long_help() {
        let mut cmd = command();
        cmd.build();
        for name in subcommands() {
            let sub = cmd.find_subcommand_mut(&name).expect("listed by clap");
            let long = sub.render_long_help().to_string();
            assert!(long.contains("Examples:\n  vd-tool "), "{name}: {long}");
            let short = sub.render_help().to_string();
            assert!(!short.contains("Examples:"), "{name}: -h stays short");
            // -h and --help open with the same line.
            assert_eq!(long.lines().next(), short.lines().next(), "{name}");
        }
    }

    #[test]
    fn top_level_help_lists_the_groups_with_each_command() {
        let help = command().render_help().to_string();
        for (group, names) in GROUPS {
            let at = help.find(&format!("{group}:\n")).expect(group);
            let section = help[at..].split("\n\n").next().unwrap_or_default();
            for name in *names {
                let line = format!("\n  {name} ");
                assert!(section.contains(&line), "{name} under {group}:\n{help}");
            }
        }
        command().debug_assert();
    }
}
