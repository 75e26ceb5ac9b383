//! One test per protocol rule the server side must honour (proto.md).

use nbd::consts::*;
use nbd::transmission::*;
use nbd::*;

fn export(size: u64) -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "test".into(),
        size,
        flags: TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_FAST_ZERO
            | TFLAG_SEND_DF
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE,
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
    }
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_req(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

fn meta_req(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Parsed option replies: (option, reply type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut r = Vec::new();
    while out.len() >= 20 {
        assert_eq!(
            u64::from_be_bytes(out[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let o = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let l = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        r.push((o, t, out[20..20 + l].to_vec()));
        out = &out[20 + l..];
    }
    assert!(out.is_empty(), "trailing bytes in option replies");
    r
}

fn started() -> Handshake {
    let mut h = Handshake::new(vec![export(1 << 20)]);
    let mut out = Vec::new();
    let (used, st) = h.feed(
        &(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes(),
        &mut out,
    );
    assert_eq!((used, st), (4, HandshakeStatus::Continue));
    h
}

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let mut g = Vec::new();
    greeting(&mut g);
    assert_eq!(g.len(), 18);
    assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut h = Handshake::new(vec![export(4096)]);
    let mut out = Vec::new();
    let (_, st) = h.feed(&0x80u32.to_be_bytes(), &mut out);
    assert!(matches!(
        st,
        HandshakeStatus::End(HandshakeEnd::ProtocolViolation(_))
    ));
}

#[test]
fn unknown_option_gets_err_unsup_and_next_option_still_parses() {
    let mut h = started();
    let mut input = opt(0x4242, b"junk data");
    input.extend(opt(OPT_LIST, b""));
    let mut out = Vec::new();
    let (used, st) = h.feed(&input, &mut out);
    assert_eq!(used, input.len());
    assert_eq!(st, HandshakeStatus::Continue);
    let r = replies(&out);
    assert_eq!(r[0].0, 0x4242);
    assert_eq!(r[0].1, REP_ERR_UNSUP);
    assert_eq!(r[1].1, REP_SERVER);
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn option_split_across_reads_is_reassembled() {
    let mut h = started();
    let input = opt(OPT_GO, &info_req("disk", &[]));
    let mut out = Vec::new();
    let mut used = 0;
    for i in 0..input.len() - 1 {
        let (u, st) = h.feed(&input[used..=i], &mut out);
        used += u;
        assert_eq!(st, HandshakeStatus::Continue);
    }
    let (_, st) = h.feed(&input[used..], &mut out);
    assert!(matches!(st, HandshakeStatus::Done(_)));
}

#[test]
fn bad_option_magic_is_a_protocol_violation() {
    let mut h = started();
    let mut input = opt(OPT_LIST, b"");
    input[0] ^= 1;
    let mut out = Vec::new();
    let (_, st) = h.feed(&input, &mut out);
    assert!(matches!(
        st,
        HandshakeStatus::End(HandshakeEnd::ProtocolViolation(_))
    ));
}

#[test]
fn oversized_option_is_discarded_and_answered_too_big() {
    let mut h = started();
    let big = vec![0u8; MAX_OPTION_LEN as usize + 10];
    let mut input = opt(OPT_INFO, &big);
    input.extend(opt(OPT_LIST, b""));
    let mut out = Vec::new();
    let (used, st) = h.feed(&input, &mut out);
    assert_eq!((used, st), (input.len(), HandshakeStatus::Continue));
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ERR_TOO_BIG);
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn oversized_export_name_closes_without_an_option_reply() {
    let mut h = started();
    let input = opt(OPT_EXPORT_NAME, &vec![b'a'; MAX_OPTION_LEN as usize + 1]);
    let mut out = Vec::new();
    let (_, st) = h.feed(&input, &mut out);
    assert!(matches!(
        st,
        HandshakeStatus::End(HandshakeEnd::UnknownExport(_))
    ));
    // EXPORT_NAME has no replies: a client would read one as the size.
    assert!(out.is_empty());
}

#[test]
fn plain_newstyle_client_may_only_send_export_name() {
    for option in [OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, 0x4242] {
        let mut h = Handshake::new(vec![export(4096)]);
        let mut out = Vec::new();
        let (used, st) = h.feed(&0u32.to_be_bytes(), &mut out);
        assert_eq!((used, st), (4, HandshakeStatus::Continue));
        let (_, st) = h.feed(&opt(option, b""), &mut out);
        assert!(
            matches!(st, HandshakeStatus::End(HandshakeEnd::ProtocolViolation(_))),
            "option {option}: {st:?}"
        );
        assert!(out.is_empty(), "option {option} got a reply");
    }
    // EXPORT_NAME still works, with the 124 bytes of padding.
    let mut h = Handshake::new(vec![export(4096)]);
    let mut out = Vec::new();
    h.feed(&0u32.to_be_bytes(), &mut out);
    let (_, st) = h.feed(&opt(OPT_EXPORT_NAME, b"disk"), &mut out);
    assert!(matches!(st, HandshakeStatus::Done(_)));
    assert_eq!(out.len(), 8 + 2 + 124);
}

#[test]
fn abort_is_acked_and_ends_the_handshake() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(&opt(OPT_ABORT, b"ignored"), &mut out);
    assert_eq!(st, HandshakeStatus::End(HandshakeEnd::Aborted));
    assert_eq!(replies(&out)[0].1, REP_ACK);
}

#[test]
fn list_with_data_is_invalid() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_LIST, b"x"), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn info_reports_export_name_description_and_block_size_then_ack() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(
        &opt(
            OPT_INFO,
            &info_req("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        ),
        &mut out,
    );
    assert_eq!(st, HandshakeStatus::Continue);
    let r = replies(&out);
    let types: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == REP_INFO)
        .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
        .collect();
    assert_eq!(
        types,
        vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    let export = &r[0].2;
    assert_eq!(export.len(), 12);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        1 << 20
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert!(flags & TFLAG_HAS_FLAGS != 0 && flags & TFLAG_CAN_MULTI_CONN != 0);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    let bs = &r[3].2;
    assert_eq!(u32::from_be_bytes(bs[2..6].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(bs[6..10].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[10..14].try_into().unwrap()), 32 << 20);
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn info_for_unknown_export_is_err_unknown_and_handshake_continues() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(&opt(OPT_INFO, &info_req("nope", &[])), &mut out);
    assert_eq!(st, HandshakeStatus::Continue);
    assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
}

#[test]
fn malformed_info_request_is_invalid() {
    let mut h = started();
    let mut out = Vec::new();
    let mut bad = info_req("disk", &[1]);
    bad.push(0); // trailing byte
    h.feed(&opt(OPT_GO, &bad), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    out.clear();
    h.feed(&opt(OPT_GO, &[0, 0, 0, 200, b'x']), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    // NBD strings hold no NUL: malformed, not an unknown export.
    out.clear();
    h.feed(&opt(OPT_INFO, &info_req("di\0sk", &[])), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn go_with_empty_name_selects_the_default_export() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(&opt(OPT_GO, &info_req("", &[])), &mut out);
    let HandshakeStatus::Done(n) = st else {
        panic!("{st:?}")
    };
    assert_eq!(n.size, 1 << 20);
    assert!(!n.structured_replies);
}

#[test]
fn export_name_sends_size_and_flags_without_zeroes_when_negotiated() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(&opt(OPT_EXPORT_NAME, b"disk"), &mut out);
    assert!(matches!(st, HandshakeStatus::Done(_)));
    assert_eq!(out.len(), 10);
}

#[test]
fn export_name_pads_124_zeroes_without_no_zeroes() {
    let mut h = Handshake::new(vec![export(4096)]);
    let mut out = Vec::new();
    h.feed(&CLIENT_FIXED_NEWSTYLE.to_be_bytes(), &mut out);
    let (_, st) = h.feed(&opt(OPT_EXPORT_NAME, b""), &mut out);
    assert!(matches!(st, HandshakeStatus::Done(_)));
    assert_eq!(out.len(), 134);
}

#[test]
fn export_name_for_unknown_export_disconnects() {
    let mut h = started();
    let mut out = Vec::new();
    let (_, st) = h.feed(&opt(OPT_EXPORT_NAME, b"other"), &mut out);
    assert!(matches!(
        st,
        HandshakeStatus::End(HandshakeEnd::UnknownExport(_))
    ));
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STRUCTURED_REPLY, b"x"), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn meta_context_before_structured_replies_is_invalid() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(
        &opt(OPT_SET_META_CONTEXT, &meta_req("disk", &[BASE_ALLOCATION])),
        &mut out,
    );
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn list_meta_context_returns_base_allocation_for_empty_and_wildcard_queries() {
    for q in [&[][..], &["base:"][..], &[BASE_ALLOCATION][..]] {
        let mut h = started();
        let mut out = Vec::new();
        h.feed(&opt(OPT_STRUCTURED_REPLY, b""), &mut out);
        out.clear();
        h.feed(&opt(OPT_LIST_META_CONTEXT, &meta_req("disk", q)), &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_META_CONTEXT, "query {q:?}");
        // "For NBD_OPT_LIST_META_CONTEXT the server SHOULD set [the id] to zero."
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 0], "query {q:?}: context id");
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(r[1].1, REP_ACK);
    }
}

#[test]
fn unknown_meta_contexts_are_ignored() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STRUCTURED_REPLY, b""), &mut out);
    out.clear();
    h.feed(
        &opt(
            OPT_SET_META_CONTEXT,
            &meta_req("disk", &["qemu:dirty-bitmap:x", "base:"]),
        ),
        &mut out,
    );
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ACK);
}

#[test]
fn set_meta_context_then_go_selects_base_allocation_and_df() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STRUCTURED_REPLY, b""), &mut out);
    h.feed(
        &opt(OPT_SET_META_CONTEXT, &meta_req("disk", &[BASE_ALLOCATION])),
        &mut out,
    );
    let (_, st) = h.feed(&opt(OPT_GO, &info_req("disk", &[])), &mut out);
    let HandshakeStatus::Done(n) = st else {
        panic!()
    };
    assert_eq!(n.base_allocation, Some(1));
    assert!(n.structured_replies);
    assert!(n.flags & TFLAG_SEND_DF != 0);
}

#[test]
fn malformed_meta_context_request_is_invalid() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STRUCTURED_REPLY, b""), &mut out);
    out.clear();
    let mut bad = meta_req("disk", &[BASE_ALLOCATION]);
    bad.truncate(bad.len() - 3);
    h.feed(&opt(OPT_SET_META_CONTEXT, &bad), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn starttls_is_refused_by_policy_not_tls_reqd() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STARTTLS, b""), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
}

#[test]
fn starttls_with_data_is_invalid_and_the_next_option_works() {
    let mut h = started();
    let mut out = Vec::new();
    h.feed(&opt(OPT_STARTTLS, b"junk"), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    out.clear();
    h.feed(&opt(OPT_STRUCTURED_REPLY, b""), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ACK);
}

// ----- transmission ---------------------------------------------------------

fn rules(structured: bool, meta: bool) -> RequestRules {
    RequestRules {
        size: 1 << 20,
        flags: TFLAG_HAS_FLAGS | export(0).flags,
        max_payload: 32 << 20,
        structured,
        base_allocation: if meta { Some(1) } else { None },
    }
}

fn req(flags: u16, kind: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&7u64.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn error_of(d: Decoded) -> (u32, u32) {
    match d {
        Decoded::Reject { error, discard, .. } => (error, discard),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn short_header_needs_more() {
    assert_eq!(
        rules(false, false).decode(&req(0, CMD_READ, 0, 1)[..27]),
        Decoded::NeedMore
    );
}

#[test]
fn bad_request_magic_is_fatal() {
    let mut r = req(0, CMD_READ, 0, 512);
    r[0] = 0;
    assert!(matches!(rules(false, false).decode(&r), Decoded::Fatal(_)));
}

#[test]
fn valid_read_and_write_decode() {
    let d = rules(false, false).decode(&req(0, CMD_READ, 4096, 512));
    let Decoded::Request(r) = d else { panic!() };
    assert_eq!(
        (r.command, r.cookie, r.offset, r.length),
        (Command::Read, 7, 4096, 512)
    );
    let Decoded::Request(w) = rules(false, false).decode(&req(CMD_FLAG_FUA, CMD_WRITE, 0, 4096))
    else {
        panic!()
    };
    assert!(w.fua());
}

#[test]
fn read_past_end_is_einval_and_write_past_end_is_enospc_with_payload_discarded() {
    let r = rules(false, false);
    assert_eq!(
        error_of(r.decode(&req(0, CMD_READ, (1 << 20) - 100, 512))),
        (EINVAL, 0)
    );
    assert_eq!(
        error_of(r.decode(&req(0, CMD_WRITE, (1 << 20) - 100, 512))),
        (ENOSPC, 512)
    );
    assert_eq!(
        error_of(r.decode(&req(0, CMD_WRITE_ZEROES, 1 << 20, 1))),
        (ENOSPC, 0)
    );
    assert_eq!(
        error_of(r.decode(&req(0, CMD_TRIM, u64::MAX, 2))),
        (EINVAL, 0)
    );
}

#[test]
fn unknown_command_is_einval() {
    assert_eq!(
        error_of(rules(false, false).decode(&req(0, 99, 0, 0))),
        (EINVAL, 0)
    );
}

#[test]
fn unknown_or_misplaced_flags_are_einval() {
    let r = rules(false, true);
    assert_eq!(
        error_of(r.decode(&req(0x4000, CMD_READ, 0, 1))),
        (EINVAL, 0)
    );
    assert_eq!(
        error_of(r.decode(&req(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 8))),
        (EINVAL, 8)
    );
    // DF only with structured replies.
    assert_eq!(
        error_of(r.decode(&req(CMD_FLAG_DF, CMD_READ, 0, 1))),
        (EINVAL, 0)
    );
    assert!(matches!(
        rules(true, true).decode(&req(CMD_FLAG_DF, CMD_READ, 0, 1)),
        Decoded::Request(_)
    ));
    assert!(matches!(
        r.decode(&req(
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            CMD_WRITE_ZEROES,
            0,
            8
        )),
        Decoded::Request(_)
    ));
    assert_eq!(
        error_of(r.decode(&req(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 0, 8))),
        (EINVAL, 8)
    );
}

/// "This flag is valid for all commands, provided NBD_FLAG_SEND_FUA has been
/// negotiated, in which case the server MUST accept all commands with this
/// bit set (even by ignoring the bit)." Without SEND_FUA it is EINVAL.
#[test]
fn fua_is_accepted_on_every_command_when_advertised() {
    let r = rules(true, true);
    assert!(r.flags & TFLAG_SEND_FUA != 0, "export(0) advertises FUA");
    for kind in [
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
    ] {
        let len = if kind == CMD_WRITE { 8 } else { 4096 };
        match r.decode(&req(CMD_FLAG_FUA, kind, 0, len)) {
            Decoded::Request(q) => assert_eq!(q.flags, CMD_FLAG_FUA, "command {kind}"),
            other => panic!("FUA on command {kind}: {other:?}"),
        }
    }
    let mut no_fua = rules(true, true);
    no_fua.flags &= !TFLAG_SEND_FUA;
    for kind in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM] {
        let len = if kind == CMD_WRITE { 8 } else { 4096 };
        let discard = if kind == CMD_WRITE { 8 } else { 0 };
        assert_eq!(
            error_of(no_fua.decode(&req(CMD_FLAG_FUA, kind, 0, len))),
            (EINVAL, discard),
            "FUA without SEND_FUA on command {kind}"
        );
    }
}

#[test]
fn write_above_maximum_is_einval_and_payload_discarded_but_huge_is_fatal() {
    let r = rules(false, false);
    assert_eq!(
        error_of(r.decode(&req(0, CMD_WRITE, 0, (32 << 20) + 1))),
        (EINVAL, (32 << 20) + 1)
    );
    assert!(matches!(
        r.decode(&req(0, CMD_WRITE, 0, u32::MAX)),
        Decoded::Fatal(_)
    ));
}

#[test]
fn read_above_maximum_is_einval() {
    let mut r = rules(false, false);
    r.size = 1 << 40;
    assert_eq!(
        error_of(r.decode(&req(0, CMD_READ, 0, (32 << 20) + 1))),
        (EINVAL, 0)
    );
}

#[test]
fn trim_and_zero_may_exceed_the_maximum_payload() {
    let mut r = rules(false, false);
    r.size = 1 << 40;
    assert!(matches!(
        r.decode(&req(0, CMD_TRIM, 0, u32::MAX)),
        Decoded::Request(_)
    ));
    assert!(matches!(
        r.decode(&req(0, CMD_WRITE_ZEROES, 0, u32::MAX)),
        Decoded::Request(_)
    ));
}

#[test]
fn block_status_needs_a_selected_context() {
    assert_eq!(
        error_of(rules(true, false).decode(&req(0, CMD_BLOCK_STATUS, 0, 512))),
        (EINVAL, 0)
    );
    assert!(matches!(
        rules(true, true).decode(&req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 512)),
        Decoded::Request(_)
    ));
}

#[test]
fn writes_on_read_only_export_are_eperm() {
    let mut r = rules(false, false);
    r.flags |= TFLAG_READ_ONLY;
    assert_eq!(error_of(r.decode(&req(0, CMD_WRITE, 0, 4))), (EPERM, 4));
    assert_eq!(error_of(r.decode(&req(0, CMD_TRIM, 0, 4))), (EPERM, 0));
    // Also where trim and zeroes are not advertised (a secondary's export).
    r.flags &= !(TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES);
    assert_eq!(error_of(r.decode(&req(0, CMD_TRIM, 0, 4))), (EPERM, 0));
    assert_eq!(
        error_of(r.decode(&req(0, CMD_WRITE_ZEROES, 0, 4))),
        (EPERM, 0)
    );
}

#[test]
fn flush_without_send_flush_is_einval() {
    let mut r = rules(false, false);
    r.flags &= !TFLAG_SEND_FLUSH;
    assert_eq!(error_of(r.decode(&req(0, CMD_FLUSH, 0, 0))), (EINVAL, 0));
}

#[test]
fn disconnect_is_a_request_whatever_its_flags() {
    let Decoded::Request(r) = rules(false, false).decode(&req(0xffff, CMD_DISC, 0, 0)) else {
        panic!()
    };
    assert_eq!(r.command, Command::Disconnect);
}

#[test]
fn structured_chunks_have_the_right_layout() {
    let mut out = Vec::new();
    offset_data_header(&mut out, 9, 4096, 512, true);
    assert_eq!(out.len(), 28);
    assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u16::from_be_bytes([out[4], out[5]]), REPLY_FLAG_DONE);
    assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_OFFSET_DATA);
    assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 8 + 512);
    out.clear();
    error_chunk(&mut out, 9, EIO, "bad");
    assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
    assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 6 + 3);
    out.clear();
    block_status_chunk(&mut out, 9, 1, &[(4096, 3), (512, 0)]);
    assert_eq!(u32::from_be_bytes(out[16..20].try_into().unwrap()), 4 + 16);
    out.clear();
    simple_reply(&mut out, 9, EINVAL);
    assert_eq!(out.len(), 16);
}
