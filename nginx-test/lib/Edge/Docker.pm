package Edge::Docker;
# What the Docker tests (docker/test/runtime.t, docker/lab/t/*.t) share: the docker command,
# container facts, and exchanges with containers' addresses from this host.

use strict;
use warnings;
use Exporter 'import';
use IO::Socket::INET;
use IO::Socket::SSL;
use Time::HiRes qw(time sleep);
use Edge::Test qw(wait_for read_until_closed);

our @EXPORT_OK = qw(docker docker_ok ip_of health_of exchange tls_exchange in_container wait_for);

# Runs docker with @args, no shell; returns its output (stdout and stderr together, or stdout
# alone when the first argument is { stdout => 1 }) and leaves its exit status in $?.
sub docker {
    my $opts = ref $_[0] eq 'HASH' ? shift : {};
    my @args = @_;
    my $pid = open(my $fh, '-|') // die "fork: $!";
    if (!$pid) {
        if ($opts->{stdout}) { open STDERR, '>', '/dev/null' } else { open STDERR, '>&', \*STDOUT }
        exec 'docker', @args;
        exit 127;
    }
    local $/;
    my $out = <$fh> // '';
    close $fh;
    return $out;
}

# As docker(), but dies with the output when docker fails.
sub docker_ok {
    my $out = docker(@_);
    die "docker @_ failed: $out" if $?;
    return $out;
}

# The container's address on its (first) network.
sub ip_of {
    my ($name) = @_;
    my $ip = docker_ok('inspect', '-f', '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}', $name);
    ($ip) = split ' ', $ip;
    return $ip;
}

# "starting", "healthy", "unhealthy", or "" without a HEALTHCHECK.
sub health_of {
    my ($name) = @_;
    my $s = docker('inspect', '-f', '{{if .State.Health}}{{.State.Health.Status}}{{end}}', $name);
    $s =~ s/\s+//g;
    return $s;
}

# A command inside a container; its output.
sub in_container {
    my ($name, @cmd) = @_;
    return docker('exec', $name, @cmd);
}

# Sends $bytes to ADDR:PORT and returns what comes back until the peer closes.
sub exchange {
    my ($addr, $port, $bytes, $timeout) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => $addr, PeerPort => $port, Timeout => 10)
        or return "connect failed: $!";
    syswrite($s, $bytes);
    return read_until_closed($s, $timeout // 20);
}

# TLS to ADDR:443 with SNI $name (the certificate is not verified: the tests compare it), then
# $bytes; returns (answer, peer certificate subject) or ("", error).
sub tls_exchange {
    my ($addr, $port, $name, $bytes) = @_;
    my $s = IO::Socket::SSL->new(PeerAddr => $addr, PeerPort => $port, Timeout => 10,
        SSL_hostname => $name, SSL_verify_mode => SSL_VERIFY_NONE)
        or return ('', "TLS failed: $SSL_ERROR");
    my $subject = $s->peer_certificate('subject');
    print $s $bytes;
    local $/;
    my $out = <$s> // '';
    close $s;
    return ($out, $subject);
}

1;
