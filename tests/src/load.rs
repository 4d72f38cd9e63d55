//! Load generation for the end-to-end bench: short connections per second (the TCP_CRR pattern),
//! requests per second over keep-alive connections, and bulk throughput, each from inside a client
//! namespace, plus the housekeeping that makes back-to-back runs comparable.
//!
//! - [`crr`] and [`rr`] run `wrk` (Debian package `wrk`) inside the client namespace. For
//!   [`crr`], wrk is given `Connection: close`: the server answers and closes, and wrk opens a new
//!   connection for every request (wrk reconnects whenever a response does not allow keep-alive;
//!   the lab test checks it with the server's TCP `PassiveOpens` counter).
//! - [`bulk`] is our own generator: one TCP connection to a `lab-pod` sink port
//!   ([`crate::pod_server::SINK_PORT`]), written to for the whole run. iperf3 would open a control
//!   and a data connection, which behind a Service VIP may land on different backends.
//! - [`settle`] runs between contenders: it flushes conntrack and waits for TIME_WAIT sockets to
//!   drain, so that one run does not inherit the previous one's state.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use vipx_lab::load;
//!
//! # fn demo(client_ns: &str, node_ns: &str) -> anyhow::Result<()> {
//! load::ensure_tools()?;
//! load::tune_client(client_ns)?;
//! let target: SocketAddr = "198.18.64.11:5000".parse()?;
//! load::settle(&[client_ns, node_ns])?;
//! let m = load::crr(client_ns, load::Spread::one(&target), Duration::from_secs(5), 32)?;
//! println!("{m}");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{in_netns, ns_command, proc_net_field, sysctls};

/// wrk threads of [`Spread::one`]: one per core of the 2-core machines the bench runs on (fewer
/// when there are fewer connections, as wrk requires).
pub const WRK_THREADS: u32 = 2;
/// wrk's per-request timeout; slower responses count as timeout errors.
pub const WRK_TIMEOUT: Duration = Duration::from_secs(2);
/// The size of each write of [`bulk`].
pub const BULK_BUFFER: usize = 256 * 1024;
/// [`settle`] waits until every namespace it is given has fewer TIME_WAIT sockets than this.
pub const SETTLE_MAX_TIME_WAIT: u64 = 1024;
/// How long [`settle`] waits at most. A TIME_WAIT socket lives 60 s on Linux.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(90);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds each write of [`bulk`], and its wait for the sink to confirm it read everything.
const BULK_IO_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// Where Debian puts the tools, in case `PATH` lacks the sbin directories.
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// `(program, Debian package)` of every tool this module runs.
const TOOLS: [(&str, &str); 2] = [("wrk", "wrk"), ("conntrack", "conntrack")];

/// The result of one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    /// The rate, in `unit`.
    pub value: f64,
    /// `conn/s` ([`crr`]), `req/s` ([`rr`]) or `Gbit/s` ([`bulk`]).
    pub unit: &'static str,
    /// Failed connections and requests: wrk's socket errors (connect, read, write, timeout) plus
    /// its non-2xx/3xx responses; always 0 for [`bulk`], which fails as a whole instead.
    pub errors: u64,
    /// How long the run actually took (wrk's own figure; for [`bulk`], connect to confirmed end).
    pub duration: Duration,
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} {} ({} errors, {:.2} s)",
            self.value,
            self.unit,
            self.errors,
            self.duration.as_secs_f64()
        )
    }
}

/// Installs what is missing of `wrk` and `conntrack` with `apt-get install -y` (running
/// `apt-get update` first only when the install fails, e.g. on stale package lists), saying what it
/// does on stderr. Does nothing when both are present.
pub fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| find_tool(program).is_none())
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    eprintln!("load: installing {list} (apt-get install -y {list})");
    if let Err(first) = apt_get(&["install", "-y", "--no-install-recommends"], &missing) {
        eprintln!("load: install failed ({first:#}); running apt-get update and retrying");
        apt_get(&["update"], &[])?;
        apt_get(&["install", "-y", "--no-install-recommends"], &missing)?;
    }
    for (program, package) in TOOLS {
        ensure!(
            find_tool(program).is_some(),
            "{program} still not found after installing {package}"
        );
    }
    eprintln!("load: installed {list}");
    Ok(())
}

/// Prepares client namespace `netns` for many short connections: the whole port range above 1023
/// for ephemeral ports (lab-pod's own listening ports are skipped by the kernel, as are all bound
/// ports), and reuse of TIME_WAIT ports for new outgoing connections.
pub fn tune_client(netns: &str) -> Result<()> {
    sysctls(
        netns,
        &[
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ],
    )
    .with_context(|| format!("tuning client namespace {netns}"))
}

/// Where a wrk run sends its requests: `threads` threads, thread `i` to `targets[i % len]`, each
/// with its share of the connections.
///
/// The bench's "direct to a pod" spreads over the same pods as a proxy would (one thread per
/// pod), and the proxies get the same number of threads, so that the ratio to direct isolates
/// the proxy's cost rather than one pod's limit or wrk's threading.
#[derive(Clone, Copy, Debug)]
pub struct Spread<'a> {
    pub targets: &'a [SocketAddr],
    pub threads: u32,
}

impl<'a> Spread<'a> {
    /// Every request to `target`, from [`WRK_THREADS`] threads.
    pub fn one(target: &'a SocketAddr) -> Self {
        Self {
            targets: std::slice::from_ref(target),
            threads: WRK_THREADS,
        }
    }

    /// One thread per target.
    pub fn each(targets: &'a [SocketAddr]) -> Self {
        Self {
            targets,
            threads: u32::try_from(targets.len()).unwrap_or(u32::MAX),
        }
    }

    /// wrk's Lua script that points each thread at its own target (`None`: one target, wrk's URL
    /// says it).
    fn script(&self) -> Option<String> {
        if self.targets.len() < 2 {
            return None;
        }
        let list = self
            .targets
            .iter()
            .map(|t| format!("{{\"{}\", \"{}\"}}", t.ip(), t.port()))
            .collect::<Vec<_>>()
            .join(", ");
        // setup() runs once per thread, in order, before the run starts.
        Some(format!(
            "local targets = {{{list}}}\nlocal n = 0\n\
             function setup(thread)\n\
             \x20 local t = targets[n % #targets + 1]\n\
             \x20 n = n + 1\n\
             \x20 thread.addr = wrk.lookup(t[1], t[2])[1]\n\
             end\n"
        ))
    }
}

/// Short connections per second from `client_ns` to the HTTP servers of `to`: wrk with
/// `Connection: close`, so that each request opens, uses and closes a connection of its own;
/// `connections` of them are in flight at any time.
///
/// wrk's duration is whole seconds: `duration` is rounded up, to at least 1 s.
pub fn crr(
    client_ns: &str,
    to: Spread<'_>,
    duration: Duration,
    connections: u32,
) -> Result<Measurement> {
    let report = wrk(client_ns, to, duration, connections, true)?;
    Ok(report.measurement("conn/s"))
}

/// Requests per second from `client_ns` to the HTTP servers of `to`, over `connections`
/// keep-alive connections that stay open for the whole run (wrk).
///
/// wrk's duration is whole seconds: `duration` is rounded up, to at least 1 s.
pub fn rr(
    client_ns: &str,
    to: Spread<'_>,
    duration: Duration,
    connections: u32,
) -> Result<Measurement> {
    let report = wrk(client_ns, to, duration, connections, false)?;
    Ok(report.measurement("req/s"))
}

/// Bulk throughput from `client_ns` to the sink at `target` (a lab-pod sink port), in Gbit/s of
/// payload: one TCP connection, written in [`BULK_BUFFER`]-sized writes for `duration`, then shut
/// down; the run ends when the sink, having read everything, closes its side. Any failure fails
/// the run.
pub fn bulk(client_ns: &str, target: SocketAddr, duration: Duration) -> Result<Measurement> {
    let what = || format!("bulk transfer from namespace {client_ns} to {target}");
    let mut stream = in_netns(client_ns, || {
        TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
    })?
    .with_context(|| format!("connecting to {target}"))
    .with_context(what)?;
    stream.set_write_timeout(Some(BULK_IO_TIMEOUT))?;
    stream.set_read_timeout(Some(BULK_IO_TIMEOUT))?;

    let buf = vec![0x5au8; BULK_BUFFER];
    let start = Instant::now();
    let end = start + duration;
    let mut bytes = 0u64;
    let mut send = || -> std::io::Result<()> {
        while Instant::now() < end {
            stream.write_all(&buf)?;
            bytes += buf.len() as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        // The sink closes only after reading to our FIN: every byte counted has been received.
        let mut rest = [0u8; 64];
        match stream.read(&mut rest)? {
            0 => Ok(()),
            n => Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("the sink sent {n} bytes; is {target} really a sink port?"),
            )),
        }
    };
    send().with_context(what)?;
    let elapsed = start.elapsed();
    Ok(Measurement {
        value: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        unit: "Gbit/s",
        errors: 0,
        duration: elapsed,
    })
}

/// Between runs: flushes conntrack in every namespace given (`conntrack -F`; an empty table is
/// fine), then waits until each of them holds fewer than [`SETTLE_MAX_TIME_WAIT`] TIME_WAIT
/// sockets, at most [`SETTLE_DEADLINE`]. Pass the client namespace (where TIME_WAIT sockets would
/// eat ephemeral ports) and the node namespace (whose conntrack table the proxies fill); backend
/// namespaces too to also wait for the servers' TIME_WAIT sockets, which take the full 60 s.
pub fn settle(namespaces: &[&str]) -> Result<()> {
    settle_with(namespaces, SETTLE_MAX_TIME_WAIT, SETTLE_DEADLINE)
}

/// [`settle`] with an explicit TIME_WAIT threshold and deadline.
pub fn settle_with(namespaces: &[&str], max_time_wait: u64, deadline: Duration) -> Result<()> {
    for ns in namespaces {
        flush_conntrack(ns)?;
    }
    let give_up = Instant::now() + deadline;
    loop {
        let mut busy = Vec::new();
        for ns in namespaces {
            let tw = tcp_counters(ns)?.time_wait;
            if tw >= max_time_wait {
                busy.push(format!("{ns}: {tw}"));
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= give_up {
            bail!(
                "TIME_WAIT sockets still at or above {max_time_wait} after {deadline:?} ({})",
                busy.join(", ")
            );
        }
        std::thread::sleep(SETTLE_POLL);
    }
}

/// Empties namespace `ns`'s conntrack table.
pub fn flush_conntrack(ns: &str) -> Result<()> {
    let conntrack = find_tool("conntrack").context("conntrack is not installed (ensure_tools)")?;
    let out = ns_command(ns, &conntrack, ["-F"])
        .output()
        .with_context(|| format!("running conntrack -F in namespace {ns}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // conntrack reports "0 flow entries have been deleted" for an empty table; older versions
    // failed with "table is empty" instead.
    if !out.status.success() && !stderr.contains("empty") {
        bail!(
            "conntrack -F in namespace {ns} failed ({}): {}",
            out.status,
            stderr.trim()
        );
    }
    Ok(())
}

/// TCP counters of one namespace, from /proc/net/snmp and /proc/net/sockstat as seen from inside
/// it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Connections this namespace opened (`Tcp: ActiveOpens`).
    pub active_opens: u64,
    /// Connections this namespace accepted, counted at SYN reception (`Tcp: PassiveOpens`).
    pub passive_opens: u64,
    /// Sockets now in TIME_WAIT (`TCP: ... tw`).
    pub time_wait: u64,
}

/// Reads namespace `ns`'s [`TcpCounters`].
pub fn tcp_counters(ns: &str) -> Result<TcpCounters> {
    // /proc/net is /proc/self/net, the namespace of the process's main thread; thread-self shows
    // the namespace of the thread that reads it.
    let (snmp, sockstat) = in_netns(ns, || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        let sockstat = std::fs::read_to_string("/proc/thread-self/net/sockstat")?;
        std::io::Result::Ok((snmp, sockstat))
    })?
    .with_context(|| format!("reading TCP counters in namespace {ns}"))?;
    let snmp_field = |name: &str| {
        proc_net_field(&snmp, "Tcp", name)
            .with_context(|| format!("no Tcp {name} in /proc/net/snmp of namespace {ns}"))
    };
    Ok(TcpCounters {
        active_opens: snmp_field("ActiveOpens")?,
        passive_opens: snmp_field("PassiveOpens")?,
        time_wait: sockstat_value(&sockstat, "TCP", "tw")
            .with_context(|| format!("no TCP tw in /proc/net/sockstat of namespace {ns}"))?,
    })
}

/// What wrk printed about one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkReport {
    /// Completed requests (`N requests in ...`).
    pub requests: u64,
    /// wrk's measured run time.
    pub duration: Duration,
    /// `Requests/sec:`.
    pub requests_per_sec: f64,
    /// `Socket errors: connect N, read N, write N, timeout N` (absent when all are 0).
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    /// `Non-2xx or 3xx responses: N` (absent when 0).
    pub non_2xx: u64,
}

impl WrkReport {
    /// All failures together.
    pub fn errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx
    }

    fn measurement(&self, unit: &'static str) -> Measurement {
        Measurement {
            value: self.requests_per_sec,
            unit,
            errors: self.errors(),
            duration: self.duration,
        }
    }
}

/// Runs wrk in `ns` against the targets of `to` and parses its report. `close`: send
/// `Connection: close`, one connection per request.
pub fn wrk(
    ns: &str,
    to: Spread<'_>,
    duration: Duration,
    connections: u32,
    close: bool,
) -> Result<WrkReport> {
    ensure!(connections > 0, "wrk needs at least one connection");
    let Some(target) = to.targets.first() else {
        bail!("wrk needs a target");
    };
    ensure!(
        to.targets.len() < 2 || connections >= to.threads,
        "{connections} connections cannot spread over {} threads",
        to.threads
    );
    let program = find_tool("wrk").context("wrk is not installed (ensure_tools)")?;
    let seconds = duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut args = vec![
        format!("--threads={}", to.threads.clamp(1, connections)),
        format!("--connections={connections}"),
        format!("--duration={seconds}s"),
        format!("--timeout={}s", WRK_TIMEOUT.as_secs().max(1)),
    ];
    if close {
        args.extend(["--header".to_owned(), "Connection: close".to_owned()]);
    }
    // Removed when the run ends (tempfile's guard).
    let _script = match to.script() {
        Some(text) => {
            let mut f = tempfile::Builder::new()
                .prefix("vipx-wrk-")
                .suffix(".lua")
                .tempfile()
                .context("creating wrk's script")?;
            f.write_all(text.as_bytes())
                .context("writing wrk's script")?;
            args.push(format!("--script={}", f.path().display()));
            Some(f)
        }
        None => None,
    };
    args.push(format!("http://{target}/"));
    let mut cmd = ns_command(ns, &program, &args);
    let line = format!("wrk {} (in namespace {ns})", args.join(" "));
    let out = cmd.output().with_context(|| format!("running {line}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            stderr.trim(),
            stdout.trim()
        );
    }
    let report =
        parse_wrk(&stdout).with_context(|| format!("{line} printed:\n{stdout}{stderr}"))?;
    ensure!(
        report.requests > 0,
        "{line} completed no request: {report:?}\n{stdout}{stderr}"
    );
    Ok(report)
}

/// Parses wrk's (4.x) report.
pub fn parse_wrk(output: &str) -> Result<WrkReport> {
    let mut report = WrkReport::default();
    let mut seen_totals = false;
    let mut seen_rate = false;
    for line in output.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            report.requests_per_sec = rate
                .trim()
                .parse()
                .with_context(|| format!("bad Requests/sec line {line:?}"))?;
            seen_rate = true;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            for item in errors.split(',') {
                let mut words = item.split_whitespace();
                let (Some(kind), Some(count), None) = (words.next(), words.next(), words.next())
                else {
                    bail!("bad Socket errors line {line:?}");
                };
                let count: u64 = count
                    .parse()
                    .with_context(|| format!("bad Socket errors line {line:?}"))?;
                match kind {
                    "connect" => report.connect_errors = count,
                    "read" => report.read_errors = count,
                    "write" => report.write_errors = count,
                    "timeout" => report.timeouts = count,
                    _ => bail!("unknown socket error kind {kind:?} in {line:?}"),
                }
            }
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            report.non_2xx = count
                .trim()
                .parse()
                .with_context(|| format!("bad Non-2xx line {line:?}"))?;
        } else if let Some((count, rest)) = line.split_once(" requests in ") {
            report.requests = count
                .trim()
                .parse()
                .with_context(|| format!("bad totals line {line:?}"))?;
            let time = rest.split(',').next().unwrap_or_default();
            report.duration =
                parse_wrk_time(time).with_context(|| format!("bad totals line {line:?}"))?;
            seen_totals = true;
        }
    }
    ensure!(seen_totals, "no `N requests in T` line in wrk's output");
    ensure!(seen_rate, "no Requests/sec line in wrk's output");
    Ok(report)
}

/// A wrk time such as `2.00s`, `987.65ms`, `1.00m`.
fn parse_wrk_time(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("bad number in {text:?}"))?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => bail!("unknown time unit in {text:?}"),
    };
    Duration::try_from_secs_f64(seconds).with_context(|| format!("bad time {text:?}"))
}

/// `TCP: inuse 5 orphan 0 tw 3 ...` style lookups in /proc/net/sockstat.
fn sockstat_value(sockstat: &str, protocol: &str, field: &str) -> Option<u64> {
    let prefix = format!("{protocol}:");
    let line = sockstat.lines().find(|line| line.starts_with(&prefix))?;
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    words
        .chunks(2)
        .find(|pair| pair[0] == field)
        .and_then(|pair| pair.get(1)?.parse().ok())
}

/// `program` on `PATH`, else in the system directories Debian installs into.
fn find_tool(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

fn apt_get(args: &[&str], packages: &[&str]) -> Result<()> {
    let line = format!("apt-get {} {}", args.join(" "), packages.join(" "));
    eprintln!("load: {}", line.trim_end());
    let out = Command::new("apt-get")
        .args(args)
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| format!("running {line}"))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            line.trim_end(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRR_OUTPUT: &str = "Running 2s test @ http://198.18.64.11:5000/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.71ms    1.02ms  22.18ms   83.21%
    Req/Sec     5.93k   412.05     6.71k    70.00%
  23627 requests in 2.00s, 2.66MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  11797.43
Transfer/sec:      1.33MB
";

    #[test]
    fn parses_a_wrk_report_with_errors() {
        let report = parse_wrk(CRR_OUTPUT).unwrap();
        assert_eq!(
            report,
            WrkReport {
                requests: 23627,
                duration: Duration::from_secs(2),
                requests_per_sec: 11797.43,
                connect_errors: 1,
                read_errors: 2,
                write_errors: 3,
                timeouts: 4,
                non_2xx: 5,
            }
        );
        assert_eq!(report.errors(), 15);
        let m = report.measurement("conn/s");
        assert_eq!((m.value, m.unit, m.errors), (11797.43, "conn/s", 15));
    }

    #[test]
    fn parses_a_clean_wrk_report_and_other_time_units() {
        let clean = "Running 1m test @ http://198.18.64.11:5000/
  1 threads and 1 connections
  600000 requests in 1.00m, 60.00MB read
Requests/sec:  10000.00
Transfer/sec:      1.00MB
";
        let report = parse_wrk(clean).unwrap();
        assert_eq!(report.requests, 600000);
        assert_eq!(report.duration, Duration::from_secs(60));
        assert_eq!(report.errors(), 0);
        assert_eq!(
            parse_wrk_time("987.50ms").unwrap(),
            Duration::from_micros(987_500)
        );
    }

    #[test]
    fn a_wrk_failure_message_is_not_a_report() {
        assert!(parse_wrk("unable to connect to 198.18.64.11:5000 Connection refused\n").is_err());
        assert!(parse_wrk("  10 requests in 1.00s, 1KB read\n").is_err());
    }

    #[test]
    fn reads_proc_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens\nTcp: 1 200 7 42\n";
        assert_eq!(proc_net_field(snmp, "Tcp", "ActiveOpens"), Some(7));
        assert_eq!(proc_net_field(snmp, "Tcp", "PassiveOpens"), Some(42));
        assert_eq!(proc_net_field(snmp, "Tcp", "Nope"), None);
        let sockstat =
            "sockets: used 10\nTCP: inuse 5 orphan 0 tw 31 alloc 7 mem 1\nUDP: inuse 1 mem 0\n";
        assert_eq!(sockstat_value(sockstat, "TCP", "tw"), Some(31));
        assert_eq!(sockstat_value(sockstat, "UDP", "tw"), None);
    }
}
