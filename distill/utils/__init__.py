"""Small pieces every room uses and that know nothing of training: errors meant for people (`errors`), the one
atomic file writer (`atomic`), safe checkpoint reading (`checkpoint`), torch.distributed in one place (`dist`),
the device resolver (`device`) and the file names of a run directory (`layout`)."""
