//! A synchronous netlink socket whose buffers are zeroized: requests to add XFRM states or
//! configure WireGuard carry keys, and dumps of them return keys.
//!
//! Batches are packed several requests to a datagram. Only the last request of a batch asks for
//! an acknowledgement; the kernel processes a datagram's requests in order during `send`, reports
//! each failure as an error message naming its sequence number, and then acknowledges the last
//! one, so one `send` and a few `recv`s replace a round trip per request.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};
use zeroize::Zeroizing;

use crate::kernel::KernelError;

/// Requests packed into one datagram, at most (a larger request goes alone).
const BATCH_BYTES: usize = 32 * 1024;
/// Requests per datagram, at most: every failing request queues an error reply before we read
/// any, and the receive buffer (net.core.rmem_max, 208 KiB by default) must hold them all.
const BATCH_MESSAGES: usize = 128;
/// A reply datagram is at most this long (the kernel sizes dump skbs well below it).
const RECV_BYTES: usize = 256 * 1024;
const EINVAL: i32 = 22;

pub(crate) struct NlSocket {
    sock: Socket,
    seq: u32,
}

impl NlSocket {
    /// [`NlSocket::open`], its error naming the socket (`what`: route, xfrm, generic).
    pub fn open_for(protocol: isize, what: &'static str) -> Result<Self, KernelError> {
        Self::open(protocol).map_err(|source| KernelError::Netlink {
            what: format!("opening a {what} netlink socket"),
            source,
        })
    }

    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Error replies then carry only the request's header, not its body (which may hold a
        // key). Kernels before 4.3 ignore it; the error text is never derived from the echo.
        sock.set_cap_ack(true)?;
        // Extended acks add the kernel's message to errors; ignored where unsupported.
        let _ = sock.set_ext_ack(true);
        // Room for large dumps; the kernel caps it at net.core.rmem_max.
        let _ = sock.set_rx_buf_sz(4usize << 20);
        Ok(Self { sock, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends every message of `msgs` with `flags` (besides REQUEST and ACK) and returns, per
    /// message, `Ok` or the errno the kernel answered. `scrub` runs on each message once it is
    /// serialized, to zero the keys it holds.
    pub fn batch<T>(
        &mut self,
        what: &'static str,
        msgs: Vec<T>,
        flags: u16,
        scrub: impl Fn(&mut T),
    ) -> Result<Vec<Result<(), i32>>, KernelError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        let mut results = vec![Ok(()); msgs.len()];
        let mut group: Vec<(NetlinkMessage<T>, usize)> = Vec::new();
        let mut group_len = 0;
        for (i, inner) in msgs.into_iter().enumerate() {
            let mut msg = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::InnerMessage(inner),
            );
            msg.finalize();
            let len = msg.buffer_len().div_ceil(4) * 4;
            if !group.is_empty() && (group_len + len > BATCH_BYTES || group.len() >= BATCH_MESSAGES)
            {
                self.flush(what, &mut group, flags, &mut results, &scrub)?;
                group_len = 0;
            }
            group.push((msg, i));
            group_len += len;
        }
        if !group.is_empty() {
            self.flush(what, &mut group, flags, &mut results, &scrub)?;
        }
        Ok(results)
    }

    /// Sends one datagram holding `group` (only its last message asks for an ack) and records
    /// the kernel's answers.
    fn flush<T>(
        &mut self,
        what: &'static str,
        group: &mut Vec<(NetlinkMessage<T>, usize)>,
        flags: u16,
        results: &mut [Result<(), i32>],
        scrub: &impl Fn(&mut T),
    ) -> Result<(), KernelError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        let total: usize = group
            .iter()
            .map(|(m, _)| m.buffer_len().div_ceil(4) * 4)
            .sum();
        let mut buf = Zeroizing::new(vec![0u8; total]);
        let mut pending = Vec::with_capacity(group.len());
        let mut offset = 0;
        let n = group.len();
        for (k, (msg, idx)) in group.iter_mut().enumerate() {
            let seq = self.next_seq();
            msg.header.sequence_number = seq;
            msg.header.flags = NLM_F_REQUEST | flags | if k + 1 == n { NLM_F_ACK } else { 0 };
            let len = msg.buffer_len();
            msg.serialize(&mut buf[offset..offset + len]);
            offset += len.div_ceil(4) * 4;
            if let NetlinkPayload::InnerMessage(inner) = &mut msg.payload {
                scrub(inner);
            }
            pending.push((seq, *idx));
        }
        group.clear();
        self.send(&buf, what)?;
        drop(buf);
        self.collect_acks(what, &pending, results)
    }

    /// Sends one request and waits for its acknowledgement.
    pub fn request<T>(
        &mut self,
        what: &'static str,
        inner: T,
        flags: u16,
        scrub: impl Fn(&mut T),
    ) -> Result<Result<(), i32>, KernelError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        let mut r = self.batch(what, vec![inner], flags, scrub)?;
        Ok(r.pop().unwrap_or(Ok(())))
    }

    fn send(&self, buf: &[u8], what: &'static str) -> Result<(), KernelError> {
        let sent = self
            .sock
            .send(buf, 0)
            .map_err(|source| KernelError::Netlink {
                what: format!("sending {what}"),
                source,
            })?;
        if sent != buf.len() {
            return Err(KernelError::Netlink {
                what: format!("sending {what}"),
                source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
            });
        }
        Ok(())
    }

    /// Reads replies until the last request of `pending` is acknowledged, recording errors.
    fn collect_acks(
        &mut self,
        what: &'static str,
        pending: &[(u32, usize)],
        results: &mut [Result<(), i32>],
    ) -> Result<(), KernelError> {
        let Some(&(last_seq, _)) = pending.last() else {
            return Ok(());
        };
        loop {
            let data = self.recv(what)?;
            let mut done = false;
            for_each_message(&data, what, |header, error| {
                if let Some(code) = error
                    && let Some(&(_, idx)) =
                        pending.iter().find(|(s, _)| *s == header.sequence_number)
                {
                    if code != 0 {
                        // An error code of i32::MIN has no errno: the request failed all the same.
                        results[idx] = Err(code.checked_neg().unwrap_or(EINVAL));
                    }
                    if header.sequence_number == last_seq {
                        done = true;
                    }
                }
            })?;
            if done {
                return Ok(());
            }
        }
    }

    /// Sends a dump request and returns every reply message's payload.
    pub fn dump<T>(&mut self, what: &'static str, inner: T) -> Result<Vec<T>, KernelError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        self.fetch(what, inner, NLM_F_DUMP)
    }

    /// Sends a request that is answered with messages (`NLM_F_DUMP`, or `NLM_F_ACK` for a single
    /// answer followed by the acknowledgement) and returns their payloads.
    pub fn fetch<T>(
        &mut self,
        what: &'static str,
        inner: T,
        flags: u16,
    ) -> Result<Vec<T>, KernelError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        let seq = self.next_seq();
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(inner),
        );
        msg.finalize();
        msg.header.sequence_number = seq;
        msg.header.flags = NLM_F_REQUEST | flags;
        let mut buf = Zeroizing::new(vec![0u8; msg.buffer_len()]);
        msg.serialize(&mut buf);
        self.send(&buf, what)?;
        let mut out = Vec::new();
        loop {
            let data = self.recv(what)?;
            if decode_replies(&data, seq, what, &mut out)? {
                return Ok(out);
            }
        }
    }

    fn recv(&mut self, what: &'static str) -> Result<Zeroizing<Vec<u8>>, KernelError> {
        let mut data = Zeroizing::new(Vec::with_capacity(RECV_BYTES));
        loop {
            match self.sock.recv(&mut *data, 0) {
                Ok(_) => return Ok(data),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(KernelError::Netlink {
                        what: format!("receiving the reply to {what}"),
                        source,
                    });
                }
            }
        }
    }
}

/// Decodes one datagram of replies to request `seq` into `out` (messages of other requests are
/// skipped) and says whether it ended the answer (`NLMSG_DONE` or an acknowledgement). The
/// datagram comes from the kernel, so nothing in it may panic: a malformed one is an error.
pub(crate) fn decode_replies<T: NetlinkDeserializable>(
    data: &[u8],
    seq: u32,
    what: &'static str,
    out: &mut Vec<T>,
) -> Result<bool, KernelError> {
    let mut offset = 0;
    while offset < data.len() {
        let len = NetlinkBuffer::new_checked(&data[offset..])
            .map_err(|_| KernelError::Decode { what })?
            .length() as usize;
        if len < 16 || offset + len > data.len() {
            return Err(KernelError::Decode { what });
        }
        let msg = deserialize::<T>(&data[offset..offset + len], what)?;
        offset += len.div_ceil(4) * 4;
        if msg.header.sequence_number != seq {
            continue;
        }
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                let code = e.raw_code();
                if code == 0 {
                    return Ok(true);
                }
                return Err(KernelError::netlink(what, errno(code, what)?));
            }
            NetlinkPayload::InnerMessage(m) => out.push(m),
            _ => {}
        }
    }
    Ok(false)
}

/// The errno of an error reply's (negative) code; `i32::MIN` has none.
fn errno(code: i32, what: &'static str) -> Result<i32, KernelError> {
    code.checked_neg().ok_or(KernelError::Decode { what })
}

/// One message of a reply. The netlink-packet crates index their buffers unchecked in places
/// (netlink-packet-core 0.9's NLA value, netlink-packet-xfrm 0.5's fixed-size headers) and panic
/// on a message shorter than its type promises; such a message is a decode error here, not a
/// crash of the agent.
fn deserialize<T: NetlinkDeserializable>(
    bytes: &[u8],
    what: &'static str,
) -> Result<NetlinkMessage<T>, KernelError> {
    std::panic::catch_unwind(|| NetlinkMessage::<T>::deserialize(bytes))
        .ok()
        .and_then(Result::ok)
        .ok_or(KernelError::Decode { what })
}

/// Calls `f(header, Some(code))` for error/ack messages (code 0 = ack) and `f(header, None)` for
/// others, without decoding payloads (which may be of any type).
pub(crate) fn for_each_message(
    data: &[u8],
    what: &'static str,
    mut f: impl FnMut(&NetlinkHeader, Option<i32>),
) -> Result<(), KernelError> {
    const NLMSG_ERROR: u16 = 2;
    let mut offset = 0;
    while offset < data.len() {
        let nb = NetlinkBuffer::new_checked(&data[offset..])
            .map_err(|_| KernelError::Decode { what })?;
        let len = nb.length() as usize;
        if len < 16 || offset + len > data.len() {
            return Err(KernelError::Decode { what });
        }
        let mut header = NetlinkHeader::default();
        header.length = nb.length();
        header.message_type = nb.message_type();
        header.flags = nb.flags();
        header.sequence_number = nb.sequence_number();
        header.port_number = nb.port_number();
        if header.message_type == NLMSG_ERROR {
            let payload = nb.payload();
            let code = payload
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(KernelError::Decode { what })?;
            f(&header, Some(code));
        } else {
            f(&header, None);
        }
        offset += len.div_ceil(4) * 4;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_generic::ctrl::GenlCtrl;
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_xfrm::XfrmMessage;

    use super::*;

    // Reply datagrams to request 7 the fuzz targets found (fuzz/corpus/netlink_*/crash-*).
    /// A generic netlink family reply with an attribute longer than its message.
    const GENL: &str = concat!(
        "2c000000100002001100000000000000010200000e0008007769726567756172640000000600010015000000",
        "1400000002000200071000000000000000000000",
    );
    /// An XFRM policy dump reply holding a message shorter than its type's header.
    const XFRM: &str = concat!(
        "080100001300020007000000000000000a0200000000000000000000000000000a0100000000000000000000",
        "000000000000000000000000020018a4000000000000000000000000ffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffff00000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000e803000000000000",
        "010000000000000044000500c0000202000000000000000000000000000000033200000002000000c0000201",
        "000000000000000000000000656b000001000000ffffffffffffffffffffffff0c001500000d000000ff0000",
        "080100001700020007000000000000000a0200000000000000000000000000000a0100000000000000000000",
        "00000000000000000000000002001810000000000000000000000000ffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffff00000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000e803000000000000",
        "000000000000000044000500c0000202000000000000000000000000000000033200000002000000c0000201",
        "000000000000000000000000656b000001000100ffffffffffffffffffffffff0c001500000d000000ff0000",
        "080100001300020007000000000000000a0200000000000000000000000000000a0100000000000000000000",
        "00000000000000000000000002001810000000000000000000000000ffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffff00000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000e803000000000000",
        "020000000000000044000500c0000202000000000000000000000000000000033200000002000000c0000201",
        "000000000000000000000000656b000001000100ffffffffffffffffffffffff0c001500000d000000ff0000",
        "1400000003000200070000000000000000000000",
    );

    fn decode<T: NetlinkDeserializable>(reply: &[u8]) -> Result<bool, KernelError> {
        decode_replies(reply, 7, "a test reply", &mut Vec::<T>::new())
    }

    /// fuzz/fuzz_targets/netlink_route.rs: an error code of `i32::MIN` has no errno, and
    /// negating it overflowed (a panic with overflow checks).
    #[test]
    fn an_error_reply_whose_code_has_no_errno_is_a_decode_error() {
        let mut reply = Vec::new();
        reply.extend_from_slice(&36u32.to_ne_bytes());
        reply.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        reply.extend_from_slice(&0u16.to_ne_bytes());
        reply.extend_from_slice(&7u32.to_ne_bytes());
        reply.extend_from_slice(&0u32.to_ne_bytes());
        reply.extend_from_slice(&i32::MIN.to_ne_bytes());
        reply.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode::<RouteNetlinkMessage>(&reply),
            Err(KernelError::Decode { .. })
        ));
        assert_eq!(errno(-95, "x").ok(), Some(95));
    }

    /// fuzz/fuzz_targets/netlink_wireguard.rs and netlink_xfrm.rs: netlink-packet-core and
    /// netlink-packet-xfrm panicked on these (slice indexes past the buffer).
    #[test]
    fn messages_the_netlink_crates_cannot_parse_are_decode_errors() {
        let genl = hex::decode(GENL).expect("hex");
        assert!(matches!(
            decode::<GenlMessage<GenlCtrl>>(&genl),
            Err(KernelError::Decode { .. })
        ));
        let xfrm = hex::decode(XFRM).expect("hex");
        assert!(matches!(
            decode::<XfrmMessage>(&xfrm),
            Err(KernelError::Decode { .. })
        ));
    }
}
