"""Bytes <-> messages: signed envelopes, msgpack with strict limits, tensor codecs.

Everything that decodes network bytes raises only `WireError` (with a ``reason`` slug).
The envelope part imports no torch; the tensor functions import it when called.
"""

from p2pfl.wire._codec import DEFAULT_LIMITS as DEFAULT_LIMITS
from p2pfl.wire._codec import DecodeLimits as DecodeLimits
from p2pfl.wire._codec import pack as pack
from p2pfl.wire._codec import unpack as unpack
from p2pfl.wire._delta import DeltaDecoder as DeltaDecoder
from p2pfl.wire._delta import DeltaEncoder as DeltaEncoder
from p2pfl.wire._delta import UpdateEncoder as UpdateEncoder
from p2pfl.wire._delta import decode_update as decode_update
from p2pfl.wire._domain import Domain as Domain
from p2pfl.wire._domain import signing_input as signing_input
from p2pfl.wire._envelope import VERSION as VERSION
from p2pfl.wire._envelope import Envelope as Envelope
from p2pfl.wire._envelope import EnvelopeVerifier as EnvelopeVerifier
from p2pfl.wire._envelope import SequenceCounter as SequenceCounter
from p2pfl.wire._envelope import seal as seal
from p2pfl.wire._errors import REASONS as REASONS
from p2pfl.wire._errors import WireError as WireError
from p2pfl.wire._tensors import CODECS as CODECS
from p2pfl.wire._tensors import decode_state_dict as decode_state_dict
from p2pfl.wire._tensors import encode_state_dict as encode_state_dict
