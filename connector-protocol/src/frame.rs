//! ZMQ multipart framing, without sockets: a request as the ROUTER sees it after the routing id
//! (uid frame, op frame, one payload frame per parameter) and the reply built from it.

use crate::{DecodeError, Op};

/// A decoded request. Frames are borrowed from the received message; nothing is copied.
#[derive(Debug, Clone, PartialEq)]
pub struct Request<'a> {
    /// The uid frame, echoed verbatim in the reply.
    pub uid: &'a [u8],
    /// The op frame, echoed verbatim in the reply.
    pub op_frame: &'a [u8],
    pub op: Op,
    pub payloads: Vec<&'a [u8]>,
}

/// A stream-control message (`[uid, b"", b"ack"|b"cancel"]`): an empty op frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamControl {
    Ack,
    Cancel,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Incoming<'a> {
    Request(Request<'a>),
    Control {
        uid: &'a [u8],
        control: Option<StreamControl>,
    },
}

/// Decode the frames after the routing id. Errors: fewer than 2 frames, an op frame that is
/// not a known id or a str. The payload count is *not* checked here (see `Request::expect`).
///
/// An empty op frame is a stream-control message: `control` is `Ack`/`Cancel` for a third
/// frame of exactly `ack`/`cancel` (raw bytes, not msgpack), `None` otherwise. The uid frame is
/// not interpreted (it is echoed verbatim).
pub fn decode_incoming<'a>(frames: &[&'a [u8]]) -> Result<Incoming<'a>, DecodeError> {
    if frames.len() < 2 {
        return Err(DecodeError::TooFewFrames {
            got: frames.len(),
            want: 2,
        });
    }
    let uid = frames[0];
    let op_frame = frames[1];
    if op_frame.is_empty() {
        let control = match frames.get(2).copied() {
            Some(b"ack") => Some(StreamControl::Ack),
            Some(b"cancel") => Some(StreamControl::Cancel),
            _ => None,
        };
        return Ok(Incoming::Control { uid, control });
    }
    let op = Op::from_frame(op_frame)?;
    Ok(Incoming::Request(Request {
        uid,
        op_frame,
        op,
        payloads: frames[2..].to_vec(),
    }))
}

impl<'a> Request<'a> {
    /// The payload frames, checked against the op's arity (`DecodeError::Arity` otherwise).
    pub fn expect(&self, n: usize) -> Result<&[&'a [u8]], DecodeError> {
        if self.payloads.len() == n {
            Ok(&self.payloads)
        } else {
            Err(DecodeError::Arity {
                op: self.op.static_name(),
                want: n,
                got: self.payloads.len(),
            })
        }
    }

    /// The payload frames checked against `self.op.arity()`. Ops of unknown arity pass as is.
    pub fn expect_arity(&self) -> Result<&[&'a [u8]], DecodeError> {
        match self.op.arity() {
            Some(n) => self.expect(n),
            None => Ok(&self.payloads),
        }
    }
}

/// A reply: the echoed uid and op frames, plus the payload (`None` = no payload frame, which
/// the client reads as a `None` result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub uid: Vec<u8>,
    pub op_frame: Vec<u8>,
    pub payload: Option<Vec<u8>>,
}

impl Reply {
    pub fn to(request: &Request<'_>, payload: Option<Vec<u8>>) -> Reply {
        Reply {
            uid: request.uid.to_vec(),
            op_frame: request.op_frame.to_vec(),
            payload,
        }
    }

    /// The frames to send after the routing id.
    pub fn frames(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.uid, &self.op_frame];
        if let Some(p) = &self.payload {
            v.push(p);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_few_frames() {
        assert_eq!(
            decode_incoming(&[]),
            Err(DecodeError::TooFewFrames { got: 0, want: 2 })
        );
        assert_eq!(
            decode_incoming(&[b"\x00"]),
            Err(DecodeError::TooFewFrames { got: 1, want: 2 })
        );
    }

    #[test]
    fn requests_borrow_their_frames() {
        let frames: [&[u8]; 4] = [b"\x07", b"\x08", b"key", b"\x01"];
        let Incoming::Request(req) = decode_incoming(&frames).unwrap() else {
            panic!()
        };
        assert_eq!(req.op, Op::Lookup);
        assert_eq!(req.uid, b"\x07");
        assert_eq!(req.op_frame, b"\x08");
        assert_eq!(req.payloads, vec![&b"key"[..], b"\x01"]);
        assert!(std::ptr::eq(req.payloads[0].as_ptr(), frames[2].as_ptr()));
        assert_eq!(req.expect(2).unwrap().len(), 2);
        assert_eq!(req.expect_arity().unwrap().len(), 2);
        assert_eq!(
            req.expect(3),
            Err(DecodeError::Arity {
                op: "lookup",
                want: 3,
                got: 2
            })
        );
        let reply = Reply::to(&req, Some(vec![0xc3]));
        assert_eq!(reply.frames(), vec![&b"\x07"[..], b"\x08", b"\xc3"]);
        assert_eq!(Reply::to(&req, None).frames().len(), 2);
    }

    #[test]
    fn arity_mismatch_and_unknown_arity() {
        let frames: [&[u8]; 3] = [b"\x00", b"\x15", b"\xc0"];
        let Incoming::Request(req) = decode_incoming(&frames).unwrap() else {
            panic!()
        };
        assert_eq!(
            req.expect_arity(),
            Err(DecodeError::Arity {
                op: "get_chunk_size",
                want: 0,
                got: 1
            })
        );
        let name = crate::codec::encode_str("plugin");
        let frames: [&[u8]; 3] = [b"\x00", &name, b"\xc0"];
        let Incoming::Request(req) = decode_incoming(&frames).unwrap() else {
            panic!()
        };
        assert_eq!(req.expect_arity().unwrap().len(), 1);
        assert_eq!(
            req.expect(0),
            Err(DecodeError::Arity {
                op: "<other>",
                want: 0,
                got: 1
            })
        );
    }

    #[test]
    fn stream_control() {
        let ack: [&[u8]; 3] = [b"\x16", b"", b"ack"];
        let cancel: [&[u8]; 3] = [b"\x16", b"", b"cancel"];
        let odd: [&[u8]; 3] = [b"\x16", b"", b"nack"];
        let bare: [&[u8]; 2] = [b"\x16", b""];
        for (frames, want) in [
            (&ack[..], Some(StreamControl::Ack)),
            (&cancel[..], Some(StreamControl::Cancel)),
            (&odd[..], None),
            (&bare[..], None),
        ] {
            assert_eq!(
                decode_incoming(frames).unwrap(),
                Incoming::Control {
                    uid: b"\x16",
                    control: want
                }
            );
        }
    }

    #[test]
    fn bad_op_frame_is_an_error() {
        let frames: [&[u8]; 2] = [b"\x00", b"\x0b"];
        assert!(matches!(
            decode_incoming(&frames),
            Err(DecodeError::UnknownOp(_))
        ));
    }
}
