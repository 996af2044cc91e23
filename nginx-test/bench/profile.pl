#!/usr/bin/perl
# Instructions per connection, under callgrind: nginx-edge against nginx's ssl_preread + map on
# the same nginx binary, for each route count, with the map's upstream named with 2 letters
# and as long as the seed's `rancher_servers_https` (proxy_pass parses and compares the name on
# every connection). Then HTTP by Host against a plain stream proxy (nginx's stream module
# cannot route by Host: that is the floor).
#
# Steady-state figures: every nginx runs W connections (warm-up: start-up, the first pool
# blocks and the heap's first growth are left out), then N more (curl, one new connection per
# request, one after another), profiled: a function's cost per connection is its instructions
# over those N, divided by N. With the same client and backends, the figures repeat within
# about 1 % (the event loop's reads and writes split a little differently from run to run).
#
# Run by nginx-test/bench/profile, which builds what it needs; see there for the settings.

use strict;
use warnings;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX qw(WNOHANG);

my @builds = map { tr/\001/ /r } split " ", ($ENV{BUILDS} // "");    # "name=...;nginx=...;module=...;preload=...", spaces as \001
my @routes = split ' ', ($ENV{ROUTES} // '10 10000');
my ($W, $N) = map { $_ // die "CONNS: two numbers\n" } (split ' ', ($ENV{CONNS} // '400 2000'))[0, 1];
my $pass = ($ENV{PASS} // 'static') eq 'variable' ? '$edge_upstream' : 'nginx_edge';
my $counters = ($ENV{COUNTERS} // 'on') eq 'off' ? 'edge_counters off;' : '';
my $long = 'rancher_servers_https';
# ONLY="edge,map t": profile these nginx only (the table's other columns stay empty).
my %only = map { $_ => 1 } split /,/, ($ENV{ONLY} // '');

my $dir = tempdir('/tmp/edge-profile.XXXXXX', CLEANUP => !$ENV{KEEP});
chmod 0755, $dir;
my $user = $> == 0 ? 'user nobody nogroup;' : '';
sub port { IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0)->sockport }
sub write_file { my ($f, $text) = @_; open my $fh, '>', $f or die "$f: $!"; print $fh $text; close $fh; chmod 0644, $f }
sub run { system(@_) == 0 or die "@_ failed\n" }

run("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 2 -keyout $dir/b.key -out $dir/b.crt 2>/dev/null");
my ($back, $backh) = (port(), port());

# What each nginx runs, and which functions are read from its profile, in table rows.
my @tls_rows = (
    ['find the name',            ['ngx_stream_edge_module::preread::preread_handler'], [':ngx_stream_ssl_preread_handler']],
    ['name -> upstream',         [],                                                   [':ngx_stream_map_variable']],
    ['proxy_pass target',        ['ngx_stream_edge_module::variables::edge_upstream', ':ngx_stream_proxy_eval'], [':ngx_stream_proxy_eval']],
    ['balancer init',            ['ngx_stream_edge_module::balancer::init_peer'],      [':ngx_stream_upstream_init_round_robin_peer']],
    ['balancer get',             ['ngx_stream_edge_module::balancer::get_peer'],       [':ngx_stream_upstream_get_round_robin_peer']],
    ['balancer free',            ['ngx_stream_edge_module::balancer::free_peer'],      [':ngx_stream_upstream_free_round_robin_peer']],
    ['log phase',                ['ngx_stream_edge_module::preread::log_handler'],     []],
    ['malloc + free',            [':malloc', ':free'],                                 [':malloc', ':free']],
);

my $runs = $ENV{RUNS} // 1;
my %runs;    # build, routes, which -> [ { function => n per connection, total => n }, per run ]
for my $run (1 .. $runs) {
    for my $spec (@builds) {
        my %b = map { split /=/, $_, 2 } split /;/, $spec;
        my $preload = $b{preload} ? "load_module $b{preload};\n" : '';
        my @procs;
        for my $n (@routes) {
            my $filler = $n > 3 ? $n - 3 : 0;
            my $routes = join '', map { qq(, "f$_.test": "t") } 1 .. $filler;
            write_file("$dir/r$n.json", qq({"upstreams": {"t": {"servers": ["127.0.0.1:$back"]}}, "routes": {"localhost": "t", "a.test": "t", "b.test": "t"$routes}}\n));
            write_file("$dir/rh$n.json", qq({"upstreams": {"t": {"servers": ["127.0.0.1:$backh"]}}, "routes": {"localhost": "t", "a.test": "t", "b.test": "t"$routes}}\n));
            write_file("$dir/rc$n.json", qq({"upstreams": {"t": {"servers": ["127.0.0.1:$back"]}}, "routes": {"localhost": "t", "a.test": "t", "b.test": "t"$routes}}\n));
            my %conf;
            # The same edge twice: as started, and after a change of its route file (a new
            # route, read as a live edge reads its changes, on a thread for a large table).
            for my $which ('edge', 'edge changed') {
                my $file = $which eq 'edge' ? "r$n.json" : "rc$n.json";
                $conf{$which} = "load_module $b{module};\nevents {}\nstream { edge_routes $dir/$file; $counters\n"
                    . "  server { listen 127.0.0.1:%PORT%; edge_route tls; proxy_pass $pass; } }\n";
            }
            for my $up ('t', $long) {
                my $map = join '', map { " f$_.test $up;" } 1 .. $filler;
                $conf{"map $up"} = "events {}\nstream { map_hash_max_size 1048576; map_hash_bucket_size 128;\n"
                    . "  map \$ssl_preread_server_name \$b { localhost $up; a.test $up; b.test $up;$map }\n"
                    . "  upstream $up { server 127.0.0.1:$back; }\n"
                    . "  server { listen 127.0.0.1:%PORT%; ssl_preread on; proxy_pass \$b; } }\n";
            }
            $conf{'edge http'} = "load_module $b{module};\nevents {}\nstream { edge_routes $dir/rh$n.json; $counters\n"
                . "  server { listen 127.0.0.1:%PORT%; edge_route http; proxy_pass $pass; } }\n";
            $conf{plain} = "events {}\nstream { server { listen 127.0.0.1:%PORT%; proxy_pass 127.0.0.1:$backh; } }\n";
            delete @conf{grep { !$only{$_} } keys %conf} if %only;
            for my $which (sort keys %conf) {
                (my $tag = "$b{name}-$n-$which") =~ s/\W/_/g;
                my $port = port();
                (my $text = $conf{$which}) =~ s/%PORT%/$port/;
                write_file("$dir/$tag.conf", "$preload$user\ndaemon off; master_process off; error_log $dir/$tag.err; pid $dir/$tag.pid;\n$text");
                push @procs, { tag => $tag, port => $port, build => $b{name}, routes => $n, which => $which,
                               http => ($which eq 'edge http' || $which eq 'plain') ? 1 : 0,
                               change => $which eq 'edge changed' ? "$dir/rc$n.json" : undef };
            }
        }
        write_file("$dir/back.conf", "$user\ndaemon off; master_process off; error_log $dir/back.err; pid $dir/back.pid;\nevents {}\n"
            . "http { access_log off; server { listen 127.0.0.1:$back ssl; ssl_certificate $dir/b.crt;\n"
            . "  ssl_certificate_key $dir/b.key; location / { return 200 ok; } }\n"
            . "  server { listen 127.0.0.1:$backh; location / { return 200 ok; } } }\n");
        my $backend = spawn($b{nginx}, '-p', "$dir/", '-c', "$dir/back.conf", '-e', "$dir/back.err");
        for my $p (@procs) {
            $p->{pid} = spawn('valgrind', '--tool=callgrind', "--callgrind-out-file=$dir/$p->{tag}.cg",
                $b{nginx}, '-p', "$dir/", '-c', "$dir/$p->{tag}.conf", '-e', "$dir/$p->{tag}.err");
        }
        listening($_) for $back, $backh, map { $_->{port} } @procs;
        for my $p (@procs) {
            my $url = ($p->{http} ? 'http' : 'https') . "://localhost:$p->{port}/";
            run("callgrind_control -z $p->{pid} >/dev/null 2>&1");
            for my $conns ($W, $N) {
                my $made = conns($url, $conns);
                die "$p->{tag}: $made of $conns connections made\n" unless $made == $conns;
                change($p) if $p->{change} && $conns == $W;
                run("callgrind_control -d $p->{pid} >/dev/null 2>&1");
            }
            kill 'TERM', $p->{pid};
            waitpid $p->{pid}, 0;
            my $counted = profile("$dir/$p->{tag}.cg.2");
            my %r = map { $_ => $counted->{$_} / $N } keys %$counted;
            push @{$runs{$p->{build}}{$p->{routes}}{$p->{which}}}, \%r;
            printf STDERR "profile: %s: %d connections after %d\n", $p->{tag}, $N, $W;
        }
        kill 'TERM', $backend;
        waitpid $backend, 0;
    }
}

# Each figure is the median of the runs.
my %result;
for my $build (keys %runs) {
    for my $n (keys %{$runs{$build}}) {
        for my $which (keys %{$runs{$build}{$n}}) {
            my @each = @{$runs{$build}{$n}{$which}};
            my %keys = map { %$_ } @each;
            for my $k (keys %keys) {
                my @v = sort { $a <=> $b } map { $_->{$k} // () } @each;
                $result{$build}{$n}{$which}{$k} = $v[$#v / 2] if @v;
            }
        }
    }
}

# The table: one block per build and route count.
my $fmt = "| %-24s | %9s | %12s | %9s | %9s |\n";
print "callgrind, instructions per connection ($N connections after $W, one after another"
    . ($runs > 1 ? "; the median of $runs runs" : '') . ")\n";
print "nginx-edge with `proxy_pass $pass;` (as started, and after a change of its route file);\n"
    . "nginx map with `ssl_preread on; proxy_pass \$b;`, its upstream named `t` or `$long`\n\n";
my @cols = ('edge', 'edge changed', 'map t', "map $long");
for my $spec (@builds) {
    my ($name) = $spec =~ /name=([^;]+)/;
    for my $n (@routes) {
        my $r = $result{$name}{$n};
        print "$name, $n routes, TLS by SNI\n\n";
        printf $fmt, 'step', 'edge', 'edge changed', 'map t', 'map long';
        printf $fmt, '-' x 24, '-' x 9, '-' x 12, '-' x 9, '-' x 9;
        for my $row (@tls_rows) {
            my ($label, $edge_fns, $map_fns) = @$row;
            printf $fmt, $label, map { sum($r->{$_}, /^edge/ ? $edge_fns : $map_fns) } @cols;
        }
        my %whole = map { $_ => $r->{$_}{total} } @cols;
        printf $fmt, '**whole worker**', map { defined $whole{$_} ? int($whole{$_} + 0.5) : '' } @cols;
        for my $map ('map t', "map $long") {
            printf $fmt, "/ $map" =~ s/map $long/map long/r,
                (map { $whole{$_} && $whole{$map} ? sprintf('%.3f', $whole{$_} / $whole{$map}) : '' } 'edge', 'edge changed'), '', '';
        }
        print "\n";
        printf "HTTP by Host: nginx-edge %d, plain stream proxy (no routing) %d per connection\n\n",
            $r->{'edge http'}{total} + 0.5, $r->{plain}{total} + 0.5 if $r->{'edge http'} && $r->{plain};
    }
}
print "('-': the function is not named in this nginx's symbols, or not called)\n";

sub sum {
    my ($r, $fns) = @_;
    return '' unless @$fns && $r;
    my ($n, $any) = (0, 0);
    for my $fn (@$fns) {
        next unless exists $r->{$fn};
        $n += $r->{$fn};
        $any = 1;
    }
    return $any ? int($n + 0.5) : '-';
}

# Adds a route to an edge's file and waits until the edge routes it (its connections are
# part of the warm-up).
sub change {
    my ($p) = @_;
    open my $in, '<', $p->{change} or die "$p->{change}: $!";
    my $text = do { local $/; <$in> };
    close $in;
    $text =~ s/"localhost": "t"/"localhost": "t", "changed.test": "t"/ or die "no route to add to\n";
    write_file("$p->{change}.new", $text);
    rename "$p->{change}.new", $p->{change} or die "rename: $!";
    for (1 .. 1200) {
        my $code = `curl -sk -o /dev/null -w '%{http_code}' --resolve changed.test:$p->{port}:127.0.0.1 https://changed.test:$p->{port}/`;
        return if $code eq '200';
        select undef, undef, undef, 0.1;
    }
    die "$p->{tag}: the changed table was not in service after 120 s\n";
}

sub spawn {
    my @cmd = @_;
    my $pid = fork // die "fork: $!";
    if (!$pid) {
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', '/dev/null';
        exec @cmd or exit 127;
    }
    return $pid;
}

sub listening {
    my ($port) = @_;
    for (1 .. 1200) {
        return if IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 1);
        select undef, undef, undef, 0.1;
    }
    die "nothing listens on $port after 120 s\n";
}

# One curl making $n connections one after another; returns how many it made.
sub conns {
    my ($url, $n) = @_;
    open my $curl, '-|', 'curl', '-sk', '-o', '/dev/null', '-H', 'Connection: close', '-w', '%{num_connects}\n', "$url\[1-$n]"
        or die "curl: $!";
    my $made = 0;
    while (my $line = <$curl>) {
        $made += $1 if $line =~ /^(\d+)$/;
    }
    close $curl;
    return $made;
}

# A dump's inclusive instructions per function, and the program's total.
sub profile {
    my ($file) = @_;
    # A dump is written while the process runs on: complete once its last line is there.
    for (1 .. 1200) {
        last if -s $file && `tail -c 200 $file` =~ /^totals: /m;
        select undef, undef, undef, 0.1;
    }
    my %r;
    local $_;
    open my $in, '-|', 'callgrind_annotate', '--inclusive=yes', '--threshold=100', $file or die;
    while (<$in>) {
        local $_ = $_;
        if (/^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+PROGRAM TOTALS/ || /^\s*([\d,]+)\s+\S*\s*PROGRAM TOTALS/) {
            ($r{total} = $1) =~ tr/,//d;
        } elsif (/^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S+)/) {
            (my $n = $1) =~ tr/,//d;
            my $fn = $2;
            for my $want ('ngx_stream_edge_module::preread::preread_handler', 'ngx_stream_edge_module::preread::log_handler',
                'ngx_stream_edge_module::balancer::init_peer', 'ngx_stream_edge_module::balancer::get_peer',
                'ngx_stream_edge_module::balancer::free_peer', 'ngx_stream_edge_module::variables::edge_upstream') {
                $r{$want} //= $n if index($fn, $want) >= 0;
            }
            if ($fn =~ /(:[a-z_0-9]+)$/) {
                $r{$1} //= $n;
            }
        }
    }
    close $in;
    return \%r;
}
