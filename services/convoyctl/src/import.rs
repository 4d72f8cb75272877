//! `convoyctl import claude-code`: a folder of Claude Code transcripts (or one file) into
//! a team's conversations, through IngestService.
//!
//! Every file is scanned first (the [`Catalog`]: titles, projects, tool names, usage), then
//! each file's new lines go to the server in one IngestEvents stream, after the
//! declarations of the sessions they belong to. Only complete lines are read: a line being
//! written is taken once its newline is there. After each file's stream is acknowledged its
//! offset goes to the state file, so an interrupted import goes on where it stopped (and
//! re-sending is harmless anyway: the server skips event ids it has). `--follow` then keeps
//! looking for lines appended to the files (and for new files) every [`FOLLOW_POLL`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Seek};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use convoy_client::{ClientConfig, Discovery, Transport};
use convoy_proto::v1 as pb;
use convoy_proto::v1::ingest_service_client::IngestServiceClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::claude_code::{Catalog, Converted, file_session};

/// How often `--follow` looks at the files again.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Most lines sent in one stream: a file longer than this goes in several, each
/// acknowledged (and its offset saved) before the next.
pub const LINES_PER_STREAM: usize = 5_000;

/// What to import, and where.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// A projects folder (searched for `*.jsonl`, recursively) or one file.
    pub path: PathBuf,
    /// The team the conversations belong to.
    pub team: String,
    /// Where each file's imported offset is kept (`None`: every line is sent again).
    pub state_file: Option<PathBuf>,
    /// Send every line, whatever the state file says (it is still updated).
    pub full: bool,
}

/// `convoyctl import claude-code`'s arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ClaudeCodeArgs {
    /// A projects folder (`~/.claude/projects`, searched for `*.jsonl`) or one transcript.
    pub path: PathBuf,
    /// The team whose conversations the sessions become.
    #[arg(long)]
    pub team: String,
    /// Keep watching the files for appended lines (and the folder for new files) until
    /// interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Where the offsets already imported are kept, per team and file, so a second run
    /// sends only what is new. Default: `$XDG_STATE_HOME/convoy/claude-code-import.json`
    /// (`~/.local/state/...`).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Send every line again, whatever the state file says (the server skips what it has).
    #[arg(long)]
    pub full: bool,
    /// Conversation service instances (`host:port`, repeat), instead of the ones registered
    /// in etcd.
    #[arg(long = "addr", value_delimiter = ',')]
    pub addr: Vec<String>,
}

impl ClaudeCodeArgs {
    /// The options these arguments ask for.
    pub fn options(&self) -> ImportOptions {
        let state_file = self.state_file.clone().or_else(|| {
            let base = std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state"))
                })?;
            Some(base.join("convoy/claude-code-import.json"))
        });
        ImportOptions {
            path: self.path.clone(),
            team: self.team.clone(),
            state_file,
            full: self.full,
        }
    }
}

/// The ingestion client `convoyctl import` uses: the SDK's mesh transport (balancing,
/// breakers, TLS, the token), with a per-call deadline long enough for a stream of
/// [`LINES_PER_STREAM`] lines.
pub fn client(
    discovery: &Discovery,
    access: &crate::access::Access,
) -> IngestServiceClient<Transport> {
    let config = access.with(ClientConfig {
        per_call_timeout: Duration::from_secs(300),
        ..ClientConfig::default()
    });
    IngestServiceClient::new(convoy_client::transport(discovery, "conversation", config))
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportSummary {
    /// Files read.
    pub files: usize,
    /// Sessions (conversations) with lines in them.
    pub sessions: usize,
    /// Lines read (new since the last import, when a state file is kept).
    pub lines: u64,
    /// Events the server stored.
    pub stored: i64,
    /// Events the server had already.
    pub duplicates: i64,
    /// Tokens of the sessions read, each assistant message counted once.
    pub tokens: pb::TokenUsage,
    /// Lines not stored, with the server's or this reader's reason (the first 1000).
    pub skipped: Vec<(String, String)>,
    /// Lines not stored, in all.
    pub skipped_count: i64,
}

impl ImportSummary {
    fn add(&mut self, response: pb::IngestEventsResponse) {
        self.stored += response.stored_count;
        self.duplicates += response.duplicate_count;
        self.skipped_count += response.rejected_count;
        for error in response.errors {
            self.skip(
                error.source,
                format!("{}: {}", error.field, error.description),
                false,
            );
        }
    }

    fn skip(&mut self, source: String, reason: String, count: bool) {
        if count {
            self.skipped_count += 1;
        }
        if self.skipped.len() < 1000 {
            self.skipped.push((source, reason));
        }
    }

    /// The human summary.
    pub fn render(&self) -> String {
        let t = &self.tokens;
        let mut out = format!(
            "{} files, {} sessions, {} lines: {} events stored, {} already there, {} lines skipped\n\
             tokens: {} input, {} output, {} cache creation, {} cache read\n",
            self.files,
            self.sessions,
            self.lines,
            self.stored,
            self.duplicates,
            self.skipped_count,
            t.input_tokens,
            t.output_tokens,
            t.cache_creation_input_tokens,
            t.cache_read_input_tokens,
        );
        for (source, reason) in &self.skipped {
            out.push_str(&format!("  skipped {source}: {reason}\n"));
        }
        out
    }
}

/// Imported offsets per team and file, as the state file keeps them.
#[derive(Debug, Default, Deserialize, Serialize)]
struct State {
    /// `team` → file path → bytes imported.
    offsets: BTreeMap<String, BTreeMap<PathBuf, u64>>,
}

impl State {
    fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not an import state file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written to a temporary file and renamed: a crash leaves the old state or the new.
    fn save(&self, path: Option<&Path>) -> anyhow::Result<()> {
        let Some(path) = path else { return Ok(()) };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// The `*.jsonl` files under `path` (or `path` itself), sorted.
fn transcripts(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut found = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// One complete line of a file.
struct Line {
    /// From 1, counted from the file's start.
    number: u64,
    text: String,
    /// The offset after it.
    end: u64,
}

/// A place in a file: a byte offset at a line's start, and the number of lines before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Position {
    offset: u64,
    lines: u64,
}

/// The complete lines of `path` from `from` on, and the position after the last. A file
/// shorter than `from` (rewritten) is read from its start.
fn lines_from(path: &Path, from: Position) -> anyhow::Result<(Vec<Line>, Position)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut at = if from.offset > file.metadata()?.len() {
        Position::default()
    } else {
        from
    };
    file.seek(std::io::SeekFrom::Start(at.offset))?;
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            // The end, or a line still being written.
            break;
        }
        at.offset += n as u64;
        at.lines += 1;
        let text = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        if !text.trim().is_empty() {
            out.push(Line {
                number: at.lines,
                text,
                end: at.offset,
            });
        }
    }
    Ok((out, at))
}

/// An import in progress: the catalog and what each file has had scanned and sent.
pub struct Importer {
    client: IngestServiceClient<Transport>,
    options: ImportOptions,
    catalog: Catalog,
    state: State,
    /// How far each file is scanned into the catalog.
    scanned: BTreeMap<PathBuf, Position>,
    summary: ImportSummary,
    sessions: BTreeSet<Uuid>,
    /// Files sent in this run (a `full` run sends each from its start once).
    sent_once: BTreeSet<PathBuf>,
}

impl Importer {
    /// An importer sending through `client`.
    pub fn new(
        client: IngestServiceClient<Transport>,
        options: ImportOptions,
    ) -> anyhow::Result<Self> {
        let state = State::load(options.state_file.as_deref())?;
        Ok(Self {
            client,
            options,
            catalog: Catalog::default(),
            state,
            scanned: BTreeMap::new(),
            summary: ImportSummary::default(),
            sessions: BTreeSet::new(),
            sent_once: BTreeSet::new(),
        })
    }

    /// What the import has done so far.
    pub fn summary(&self) -> ImportSummary {
        let mut summary = self.summary.clone();
        summary.sessions = self.sessions.len();
        summary.files = self.scanned.len();
        for id in &self.sessions {
            let t = self
                .catalog
                .sessions()
                .get(id)
                .map(|s| s.tokens())
                .unwrap_or_default();
            summary.tokens.input_tokens += t.input_tokens;
            summary.tokens.output_tokens += t.output_tokens;
            summary.tokens.cache_creation_input_tokens += t.cache_creation_input_tokens;
            summary.tokens.cache_read_input_tokens += t.cache_read_input_tokens;
        }
        summary
    }

    /// One pass: scans what is new in every file, then sends each file's new lines.
    /// `progress` hears (lines sent, lines to send) as streams are acknowledged.
    pub async fn pass(&mut self, mut progress: impl FnMut(u64, u64)) -> anyhow::Result<u64> {
        let files = transcripts(&self.options.path)?;
        // 1. Scan: the catalog learns every new complete line.
        let mut batches = Vec::new();
        for path in files {
            let from = self.scanned.get(&path).copied().unwrap_or_default();
            let (lines, end) = lines_from(&path, from)?;
            let session = file_session(&path);
            for line in &lines {
                self.catalog.scan(session, &line.text);
            }
            self.scanned.insert(path.clone(), end);
            batches.push((path, session, lines));
        }
        self.catalog.resolve_summaries();
        // 2. Send, of what was scanned, what the state file has not seen acknowledged
        // (everything the first time a file is scanned in this run, when the state is new).
        let team = self.options.team.clone();
        let mut total = 0u64;
        for (path, _, lines) in &mut batches {
            let mut done = self.offset(path);
            if done > self.scanned[path.as_path()].offset {
                // The file was rewritten shorter than what was imported: all of it again.
                done = 0;
            }
            lines.retain(|l| l.end > done);
            total += lines.len() as u64;
        }
        let mut sent = 0u64;
        for (path, session, lines) in batches {
            for chunk in lines.chunks(LINES_PER_STREAM) {
                self.send(&team, &path, session, chunk).await?;
                sent += chunk.len() as u64;
                progress(sent, total);
            }
        }
        self.summary.lines += sent;
        Ok(sent)
    }

    fn offset(&self, path: &Path) -> u64 {
        if self.options.full && !self.sent_once.contains(path) {
            return 0;
        }
        self.state
            .offsets
            .get(&self.options.team)
            .and_then(|files| files.get(path))
            .copied()
            .unwrap_or(0)
    }

    /// One stream: the declarations of the sessions `lines` touch, then the lines; on its
    /// acknowledgement, the file's offset is saved.
    async fn send(
        &mut self,
        team: &str,
        path: &Path,
        file: Uuid,
        lines: &[Line],
    ) -> anyhow::Result<()> {
        let mut messages = Vec::with_capacity(lines.len() + 1);
        let mut declared = BTreeSet::new();
        let mut body = Vec::with_capacity(lines.len());
        // A line that is not a transcript object goes with the session of the lines around
        // it (the server refuses it, and it must not declare a session of its own).
        let mut around = file;
        for line in lines {
            let source = format!("{}:{}", path.display(), line.number);
            let (session, item) = match self.catalog.convert(file, &line.text) {
                Converted::Events(session, events) => (
                    session,
                    events
                        .into_iter()
                        .map(|event| pb::IngestLine {
                            conversation: crate::claude_code::conversation_name(team, session),
                            source: source.clone(),
                            event: Some(event),
                            raw_line: String::new(),
                        })
                        .collect::<Vec<_>>(),
                ),
                Converted::Raw(raw) => {
                    body.push(pb::IngestEventsRequest {
                        item: Some(pb::ingest_events_request::Item::Line(pb::IngestLine {
                            conversation: crate::claude_code::conversation_name(team, around),
                            source,
                            event: None,
                            raw_line: raw,
                        })),
                    });
                    continue;
                }
                Converted::Skipped(why) => {
                    self.summary.skip(source, why, true);
                    continue;
                }
            };
            around = session;
            if declared.insert(session) {
                self.sessions.insert(session);
                messages.push(pb::IngestEventsRequest {
                    item: Some(pb::ingest_events_request::Item::Conversation(
                        self.catalog.declaration(team, session),
                    )),
                });
            }
            body.extend(item.into_iter().map(|line| pb::IngestEventsRequest {
                item: Some(pb::ingest_events_request::Item::Line(line)),
            }));
        }
        messages.extend(body);
        let response = self
            .client
            .ingest_events(tokio_stream::iter(messages))
            .await
            .with_context(|| format!("importing {}", path.display()))?
            .into_inner();
        self.summary.add(response);
        self.sent_once.insert(path.to_owned());
        if let Some(Line { end, .. }) = lines.last() {
            self.state
                .offsets
                .entry(team.to_owned())
                .or_default()
                .insert(path.to_owned(), *end);
            self.state.save(self.options.state_file.as_deref())?;
        }
        Ok(())
    }

    /// Passes every [`FOLLOW_POLL`] until `stop` completes.
    pub async fn follow(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
            self.pass(|_, _| {}).await?;
        }
    }
}
