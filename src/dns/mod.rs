//! Cluster DNS: the Kubernetes DNS-Based Service Discovery specification answered
//! from a [`Zone`] compiled beside every snapshot (see [`zone`]), over UDP and TCP
//! ([`server`]).
//!
//! The zone is its own immutable view rather than part of the data-plane
//! `Snapshot`: DNS needs headless and ExternalName Services and endpoint
//! hostnames, which the snapshot leaves out, and the data plane needs none of
//! the DNS names. Both are compiled from the same store in the same step of the
//! control loop and published through `ArcSwap`, so they never disagree for long.
//!
//! [`answer`] is the whole query path: hickory-proto parses the query (names with
//! compression, bounds, loops), then the response is assembled from the zone's
//! precomputed records into a caller-owned buffer, so a query allocates nothing
//! beyond what parsing needs. Hostile input never panics: a query that does not
//! parse gets FORMERR when its header is readable, and is dropped otherwise; a
//! response is never answered.

pub(crate) mod parts;
#[cfg(test)]
mod proptests;
pub(crate) mod server;
pub(crate) mod zone;

use hickory_proto::op::{Header, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

pub use parts::ZoneParts;
pub use zone::{Lookup, Zone, ZoneConfig, ZoneError};

/// Largest UDP response without EDNS (RFC 1035).
pub const UDP_MIN: usize = 512;
/// Largest UDP response ringvip sends even when a client offers more (the DNS
/// flag day 2020 value, which avoids IP fragmentation).
pub const UDP_MAX: usize = 1232;
/// Largest message over TCP (the two-byte length prefix).
pub const TCP_MAX: usize = 65535;
/// At most this many records in a query's additional section (OPT, a TSIG, a
/// cookie-less client never sends more); more is FORMERR.
const MAX_ADDITIONAL: u16 = 4;

/// Response codes used here.
mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
}

/// Where the query came from: sets the size limit of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the EDNS size up to [`UDP_MAX`]; larger answers are
    /// truncated (TC) so the client retries over TCP.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// What to do with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the buffer back.
    Reply,
    /// The name is outside the zone and an upstream is configured: send the query
    /// there and relay its answer.
    Forward,
    /// Send nothing (not a query, or not even a header).
    Drop,
}

/// Options of the responder that are not part of the zone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Names outside the zone are forwarded (else REFUSED).
    pub forward: bool,
}

/// A parsed query: what building the response needs.
struct Parsed {
    id: u16,
    opcode: u8,
    rd: bool,
    cd: bool,
    query: Query,
    /// End of the question in the query bytes (it starts at 12).
    question_end: usize,
    /// EDNS: UDP payload size the client accepts.
    edns: Option<u16>,
    /// EDNS version other than 0 (answered BADVERS).
    bad_version: bool,
}

enum ParseError {
    /// Not even a header, or a response: no answer at all.
    Drop,
    /// Header readable: answer with this code and no question.
    Code(u8),
}

fn parse(msg: &[u8]) -> Result<Parsed, ParseError> {
    let Some(hdr) = msg.first_chunk::<12>() else {
        return Err(ParseError::Drop);
    };
    // Never answer a response (a reflected or looped message).
    if hdr[2] & 0x80 != 0 {
        return Err(ParseError::Drop);
    }
    let mut d = BinDecoder::new(msg);
    let header = Header::read(&mut d).map_err(|_| ParseError::Code(rcode::FORMERR))?;
    let meta = &header.metadata;
    if meta.message_type != MessageType::Query {
        return Err(ParseError::Drop);
    }
    if meta.op_code != OpCode::Query {
        return Err(ParseError::Code(rcode::NOTIMP));
    }
    let counts = header.counts;
    if counts.queries != 1 || counts.additionals > MAX_ADDITIONAL {
        return Err(ParseError::Code(rcode::FORMERR));
    }
    let query = Query::read(&mut d).map_err(|_| ParseError::Code(rcode::FORMERR))?;
    let question_end = d.index();
    let formerr = |_| ParseError::Code(rcode::FORMERR);
    // Answer and authority records have no place in a query; skipping them would
    // mean parsing up to 65535 records for nothing.
    if counts.answers != 0 || counts.authorities != 0 {
        return Err(ParseError::Code(rcode::FORMERR));
    }
    let (_, edns, _) = hickory_proto::op::Message::read_records(
        &mut d,
        usize::from(counts.additionals),
        true,
        meta.op_code,
    )
    .map_err(formerr)?;
    Ok(Parsed {
        id: meta.id,
        opcode: u8::from(meta.op_code),
        rd: meta.recursion_desired,
        cd: meta.checking_disabled,
        query,
        question_end,
        bad_version: edns.as_ref().is_some_and(|e| e.version() != 0),
        edns: edns.map(|e| e.max_payload()),
    })
}

/// Counts and flags of a response under construction.
struct Head {
    id: u16,
    opcode: u8,
    aa: bool,
    tc: bool,
    rd: bool,
    ra: bool,
    cd: bool,
    rcode: u8,
    qd: u16,
    an: u16,
    ns: u16,
    ar: u16,
}

impl Head {
    /// Writes the 12-byte header over the start of `out` (which callers size
    /// to at least 12 bytes first; a shorter buffer is left alone).
    fn write(&self, out: &mut [u8]) {
        let Some(out) = out.first_chunk_mut::<12>() else {
            return;
        };
        let mut f: u16 = 0x8000 | (u16::from(self.opcode & 0x0f) << 11);
        if self.aa {
            f |= 0x0400;
        }
        if self.tc {
            f |= 0x0200;
        }
        if self.rd {
            f |= 0x0100;
        }
        if self.ra {
            f |= 0x0080;
        }
        if self.cd {
            f |= 0x0010;
        }
        f |= u16::from(self.rcode & 0x0f);
        out[0..2].copy_from_slice(&self.id.to_be_bytes());
        out[2..4].copy_from_slice(&f.to_be_bytes());
        out[4..6].copy_from_slice(&self.qd.to_be_bytes());
        out[6..8].copy_from_slice(&self.an.to_be_bytes());
        out[8..10].copy_from_slice(&self.ns.to_be_bytes());
        out[10..12].copy_from_slice(&self.ar.to_be_bytes());
    }
}

/// Writes the question at offset 12: the name uncompressed (a query may point
/// into its own header, which the response's header would not match) in the
/// client's spelling, then the type and class bytes as received. Answers name
/// their owner with a pointer to it.
fn put_question(out: &mut Vec<u8>, msg: &[u8], p: &Parsed) {
    zone::put_name(out, p.query.name());
    let type_class = p
        .question_end
        .checked_sub(4)
        .and_then(|start| msg.get(start..p.question_end));
    out.extend_from_slice(type_class.unwrap_or_default());
}

/// The OPT record of a response: our payload size, extended rcode high bits.
fn put_opt(out: &mut Vec<u8>, ext_rcode: u8) {
    out.push(0); // root owner
    out.extend_from_slice(&u16::from(RecordType::OPT).to_be_bytes());
    out.extend_from_slice(&(UDP_MAX as u16).to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, 0, 0]); // ext rcode, version 0, flags
    out.extend_from_slice(&[0, 0]); // no options
}

/// The whole response code of a DNS message: the header's 4 bits, plus the
/// high 8 bits an OPT record carries (RFC 6891), so BADVERS reads 16 rather
/// than NOERROR. Walks the sections without allocating; a message that ends
/// early or has no OPT record gives the header's code.
pub fn response_code(msg: &[u8]) -> u16 {
    let Some(&low) = msg.get(3) else {
        return 0;
    };
    let low = u16::from(low & 0x0F);
    let count = |i: usize| usize::from(u16_at(msg, i).unwrap_or(0));
    let (qd, records, additional) = (count(4), count(6) + count(8), count(10));
    let mut at = 12;
    for _ in 0..qd {
        let Some(end) = skip_name(msg, at) else {
            return low;
        };
        at = end + 4;
    }
    for i in 0..records + additional {
        // Owner name, then type (2), class (2), TTL (4), rdata length (2).
        let Some(end) = skip_name(msg, at) else {
            return low;
        };
        let (Some(rtype), Some(&ext), Some(rdlen)) =
            (u16_at(msg, end), msg.get(end + 4), u16_at(msg, end + 8))
        else {
            return low;
        };
        if i >= records && rtype == u16::from(RecordType::OPT) {
            // An OPT record's TTL starts with the rcode's high 8 bits.
            return (u16::from(ext) << 4) | low;
        }
        at = end + 10 + usize::from(rdlen);
    }
    low
}

/// The big-endian `u16` at `at`, if the message is long enough.
fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    match msg.get(at..at + 2)? {
        &[a, b] => Some(u16::from_be_bytes([a, b])),
        _ => None,
    }
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xC0 == 0xC0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// Answers one query from `zone` into `out` (cleared first). `rotate` picks where
/// multi-record address answers start, so clients spread over headless endpoints.
pub fn answer(
    zone: &Zone,
    msg: &[u8],
    transport: Transport,
    opts: Options,
    rotate: usize,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    let p = match parse(msg) {
        Ok(p) => p,
        Err(ParseError::Drop) => return Outcome::Drop,
        Err(ParseError::Code(code)) => {
            // The header parsed far enough to be a query: echo id and opcode.
            let [id0, id1, flags, ..] = msg.first_chunk::<12>().copied().unwrap_or_default();
            let head = Head {
                id: u16::from_be_bytes([id0, id1]),
                opcode: (flags >> 3) & 0x0f,
                aa: false,
                tc: false,
                rd: flags & 0x01 != 0,
                ra: opts.forward,
                cd: false,
                rcode: code,
                qd: 0,
                an: 0,
                ns: 0,
                ar: 0,
            };
            out.resize(12, 0);
            head.write(out);
            return Outcome::Reply;
        }
    };
    let mut head = Head {
        id: p.id,
        opcode: p.opcode,
        aa: true,
        tc: false,
        rd: p.rd,
        ra: opts.forward,
        cd: p.cd,
        rcode: rcode::NOERROR,
        qd: 1,
        an: 0,
        ns: 0,
        ar: u16::from(p.edns.is_some()),
    };
    let limit = match transport {
        Transport::Tcp => TCP_MAX,
        Transport::Udp => p
            .edns
            .map_or(UDP_MIN, |n| usize::from(n).clamp(UDP_MIN, UDP_MAX)),
    };
    out.resize(12, 0);
    put_question(out, msg, &p);
    let question_len = out.len();

    if p.bad_version {
        // RFC 6891: BADVERS (16) is extended rcode 1 with header rcode 0.
        head.aa = false;
        head.qd = 1;
        head.ar = 1;
        put_opt(out, 1);
        head.write(out);
        return Outcome::Reply;
    }

    let qtype = p.query.query_type();
    let class_ok = matches!(p.query.query_class(), DNSClass::IN | DNSClass::ANY);
    let lookup = if class_ok {
        zone.lookup(p.query.name(), qtype)
    } else {
        Lookup::OutOfZone
    };
    // The additional-section records of the answer, written after it.
    let mut extra: &[Box<[u8]>] = &[];
    match lookup {
        Lookup::OutOfZone => {
            if opts.forward && class_ok {
                out.clear();
                return Outcome::Forward;
            }
            head.aa = false;
            head.rcode = rcode::REFUSED;
        }
        _ if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) => {
            head.aa = false;
            head.rcode = if qtype == RecordType::OPT {
                rcode::FORMERR
            } else {
                rcode::REFUSED
            };
        }
        Lookup::NxDomain => {
            head.rcode = rcode::NXDOMAIN;
            out.extend_from_slice(zone.soa());
            head.ns = 1;
        }
        Lookup::Found(set, node) => {
            let mut an: usize = 0;
            if qtype == RecordType::ANY {
                for s in node.sets.iter() {
                    for r in s.records.iter() {
                        out.extend_from_slice(r);
                    }
                    an += s.records.len();
                }
            } else if let Some(s) = set {
                let n = s.records.len();
                let start = if n > 1 && matches!(s.rtype, RecordType::A | RecordType::AAAA) {
                    rotate % n
                } else {
                    0
                };
                let (tail, head) = s.records.split_at(start.min(n));
                for r in head.iter().chain(tail) {
                    out.extend_from_slice(r);
                }
                an = n;
                extra = &s.additional;
            }
            if an == 0 {
                // NODATA: the name exists without records of this type.
                if zone.contains(p.query.name()) {
                    out.extend_from_slice(zone.soa());
                    head.ns = 1;
                }
            } else {
                head.an = u16::try_from(an).unwrap_or(u16::MAX);
            }
        }
    }
    // Additional records are a courtesy: left out when they would not fit,
    // rather than truncating the answer (RFC 2181 section 9).
    let opt_len = if p.edns.is_some() { 11 } else { 0 };
    let extra_len: usize = extra.iter().map(|r| r.len()).sum();
    if !extra.is_empty() && out.len() + extra_len + opt_len <= limit {
        for r in extra {
            out.extend_from_slice(r);
        }
        head.ar += u16::try_from(extra.len()).unwrap_or(0);
    }
    if p.edns.is_some() {
        put_opt(out, 0);
    }
    if out.len() > limit {
        // Too big for this transport: header and question only, TC set.
        out.truncate(question_len);
        head.tc = true;
        head.an = 0;
        head.ns = 0;
        head.ar = u16::from(p.edns.is_some());
        if p.edns.is_some() {
            put_opt(out, 0);
        }
    }
    head.write(out);
    Outcome::Reply
}

/// Builds a SERVFAIL for a query that could not be forwarded (same id, question
/// echoed when it parses). `None` when the query was not one.
pub fn servfail(msg: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let p = parse(msg).ok()?;
    out.resize(12, 0);
    put_question(out, msg, &p);
    Head {
        id: p.id,
        opcode: p.opcode,
        aa: false,
        tc: false,
        rd: p.rd,
        ra: true,
        cd: p.cd,
        rcode: rcode::SERVFAIL,
        qd: 1,
        an: 0,
        ns: 0,
        ar: 0,
    }
    .write(out);
    Some(())
}

#[cfg(test)]
mod tests;
